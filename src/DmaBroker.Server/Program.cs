using DmaBroker.Core.Topology;
using DmaBroker.Server.Hosting;

if (args.Contains("--help") || args.Contains("-h"))
{
    Console.WriteLine(BrokerHost.Usage);
    return 0;
}

WebApplication app;
try
{
    app = BrokerHost.Build(args);
}
catch (Exception e) when (e is ArgumentException or TopologyException or IOException or FormatException or InvalidOperationException)
{
    Console.Error.WriteLine($"dmabroker: {e.Message}");
    Console.Error.WriteLine("Run with --help for the options.");
    return 2;
}

await app.RunAsync();
return 0;
