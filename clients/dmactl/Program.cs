using DmaBroker.Ctl;

return await Cli.RunAsync(args, Console.Out, Console.Error);
