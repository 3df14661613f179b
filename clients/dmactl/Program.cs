using DmaBroker.Ctl;

return await Cli.RunAsync(args);
