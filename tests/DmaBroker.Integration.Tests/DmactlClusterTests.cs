using System.Globalization;
using System.Text.Json;
using DmaBroker.Cluster.Tests;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// dmactl against replicas of a cluster (SPEC §16): it points at any replica; `sessions` names the
/// replica serving each session, and `group` on another replica shows the remote owner.
/// </summary>
public sealed class DmactlClusterTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);
    private const uint Group = 16;

    [Fact]
    public async Task Sessions_OnAReplica_NameTheReplica_AndAnotherReplicaShowsTheOwner()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        var endpoints = string.Join(",", etcd.Endpoints.Select(e => e.GetLeftPart(UriPartial.Authority)));
        await using var east = await LiveBroker.StartAsync("--cluster", "etcd", "--etcd-endpoints", endpoints, "--replica", "east");
        await using var west = await LiveBroker.StartAsync("--cluster", "etcd", "--etcd-endpoints", endpoints, "--replica", "west");
        await using var watch = await GroupWatch.StartAsync(west.Client);
        await using var hold = ClientProcess.StartDmactl(east.Address, "hold", Group.ToString(CultureInfo.InvariantCulture));
        await hold.WaitForLineAsync($"holding group {Group}", Timeout);
        var owned = await watch.WaitForAsync(Group, OwnerKind.User);

        // The table: a REPLICA column, last, naming east on the holder's session.
        var (exit, stdout) = await RunAsync(east.Address, "sessions");
        Assert.Equal(0, exit);
        var header = stdout.First(l => l.Contains("SESSION", StringComparison.Ordinal));
        Assert.EndsWith("REPLICA", header.TrimEnd(), StringComparison.Ordinal);
        var row = Assert.Single(stdout, l => l.TrimStart().StartsWith(owned.OwnerSession.ToString(CultureInfo.InvariantCulture) + " ", StringComparison.Ordinal));
        Assert.EndsWith("east", row.TrimEnd(), StringComparison.Ordinal);

        // JSON, as the proto names it.
        (exit, stdout) = await RunAsync(east.Address, "--json", "sessions");
        Assert.Equal(0, exit);
        using (var json = JsonDocument.Parse(Assert.Single(stdout)))
        {
            var session = Assert.Single(json.RootElement.GetProperty("sessions").EnumerateArray());
            Assert.Equal((owned.OwnerSession, "east"), (session.GetProperty("sessionId").GetUInt64(), session.GetProperty("replica").GetString()));
        }

        // The other replica serves no session, and shows east's session as the group's owner.
        (exit, stdout) = await RunAsync(west.Address, "--json", "group", Group.ToString(CultureInfo.InvariantCulture));
        Assert.Equal(0, exit);
        using (var json = JsonDocument.Parse(Assert.Single(stdout)))
        {
            var g = json.RootElement;
            Assert.Equal(("user", owned.OwnerSession), (g.GetProperty("ownerKind").GetString(), g.GetProperty("ownerSession").GetUInt64()));
        }
        (exit, stdout) = await RunAsync(west.Address, "--json", "sessions");
        Assert.Equal(0, exit);
        using (var json = JsonDocument.Parse(Assert.Single(stdout)))
            Assert.False(json.RootElement.TryGetProperty("sessions", out var listed) && listed.GetArrayLength() > 0, $"west lists sessions: {listed}");
    }

    private static async Task<(int Exit, IReadOnlyList<string> Stdout)> RunAsync(string broker, params string[] args)
    {
        await using var dmactl = ClientProcess.StartDmactl(broker, args);
        var exit = await dmactl.WaitForExitAsync(Timeout);
        return (exit, dmactl.Stdout);
    }
}
