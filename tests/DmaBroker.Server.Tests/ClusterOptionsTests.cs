using System.Collections;
using DmaBroker.Server.Hosting;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;

namespace DmaBroker.Server.Tests;

/// <summary>SPEC §16's options, read as strictly as the others: <c>--cluster</c>, <c>--etcd-endpoints</c>, <c>--replica</c>.</summary>
public sealed class ClusterOptionsTests : IDisposable
{
    private readonly string _root = Directory.CreateTempSubdirectory("dmabroker-cluster-options-").FullName;

    public void Dispose() => Directory.Delete(_root, recursive: true);

    [Theory]
    [InlineData("--cluster takes none or etcd, got 'raft'", "--cluster", "raft")]
    [InlineData("option --cluster needs a value", "--cluster")]
    [InlineData("--etcd-endpoints needs --cluster etcd", "--etcd-endpoints", "http://127.0.0.1:2379")]
    [InlineData("--replica needs --cluster etcd", "--cluster", "none", "--replica", "r1")]
    [InlineData("--cluster etcd needs --etcd-endpoints", "--cluster", "etcd", "--replica", "r1")]
    [InlineData("--cluster etcd needs --replica", "--cluster", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379")]
    [InlineData("--replica: replica name 'Replica One' must be 1-63 of a-z", "--cluster", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379", "--replica", "Replica One")]
    [InlineData("--etcd-endpoints: etcd endpoint 'https://127.0.0.1:2379/' must be http://host:port", "--cluster", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379", "--replica", "r1")]
    [InlineData("--etcd-endpoints takes http://host:port URLs, got 'etcd-1'", "--cluster", "etcd", "--etcd-endpoints", "etcd-1", "--replica", "r1")]
    public void Build_BadClusterOptions_OneLineSayingWhich(string expected, params string[] args)
    {
        var e = Assert.Throws<ArgumentException>(() => Build(new Hashtable(), args));

        Assert.StartsWith(expected, e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public async Task Build_ClusterFromOptionsOrEnvironment_TakenAsSettings()
    {
        await using var flags = Build(new Hashtable(), ["--cluster", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379,http://127.0.0.1:22379", "--replica", "r1"]);
        var o = flags.Services.GetRequiredService<BrokerHostOptions>();
        Assert.Equal(("etcd", "http://127.0.0.1:2379,http://127.0.0.1:22379", "r1"), (o.Cluster, o.EtcdEndpoints, o.Replica));

        await using var variables = Build(new Hashtable
        {
            ["DMABROKER_CLUSTER"] = "etcd",
            ["DMABROKER_ETCD_ENDPOINTS"] = "http://127.0.0.1:2379",
            ["DMABROKER_REPLICA"] = "r2",
        }, []);
        o = variables.Services.GetRequiredService<BrokerHostOptions>();
        Assert.Equal(("etcd", "r2"), (o.Cluster, o.Replica));
    }

    [Fact]
    public async Task Build_NoClusterOption_DefaultIsNone()
    {
        await using var app = Build(new Hashtable(), []);
        Assert.Equal("none", app.Services.GetRequiredService<BrokerHostOptions>().Cluster);
    }

    private WebApplication Build(Hashtable environment, string[] args) =>
        BrokerHost.Build([.. args, "--listen", "http://127.0.0.1:0", "--http-listen", "none"], environment, _root, null);
}
