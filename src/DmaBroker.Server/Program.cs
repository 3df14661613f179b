using DmaBroker.Core.Access;
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
catch (Exception e) when (e is ArgumentException or TopologyException or IOException or FormatException or InvalidOperationException or AccessPolicyException)
{
    // One line: the reason, whatever the exception's own layout.
    Console.Error.WriteLine($"dmabroker: {e.Message.ReplaceLineEndings(" ")} (see --help)");
    return 2;
}

try
{
    await app.RunAsync();
}
catch (Exception e) when (e is DmaBroker.Core.ErrnoException or DmaBroker.Cluster.ClusterUnavailableException)
{
    // Joining the cluster failed (--cluster etcd): etcd unreachable, or the replica name taken.
    Console.Error.WriteLine($"dmabroker: {e.Message.ReplaceLineEndings(" ")}");
    return 2;
}
return 0;
