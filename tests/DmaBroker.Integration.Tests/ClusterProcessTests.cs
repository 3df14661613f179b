using System.Diagnostics;
using DmaBroker.Cluster.Tests;
using DmaBroker.Protocol.V1;
using Xunit.Abstractions;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// Broker replicas as processes of their own on one real etcd (SPEC §16), a client holding a group
/// on one of them; the replica is killed (SIGKILL) or frozen (SIGSTOP), and a client of the other
/// replica must get the group within the lease TTL + 1 s.
/// </summary>
public sealed class ClusterProcessTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Ttl = TimeSpan.FromSeconds(3);
    private static readonly TimeSpan StartupTimeout = TimeSpan.FromSeconds(30);
    private const uint Group = 16;

    private static Task<LiveBroker> ReplicaAsync(EtcdCluster etcd, string name) => LiveBroker.StartAsync(
        "--cluster", "etcd", "--etcd-endpoints", string.Join(",", etcd.Endpoints.Select(e => e.GetLeftPart(UriPartial.Authority))),
        "--replica", name, "--lease-ttl-ms", ((int)Ttl.TotalMilliseconds).ToString(System.Globalization.CultureInfo.InvariantCulture));

    [Fact]
    public async Task ReplicaSigKilled_ItsGroupIsFreeWithinTtlPlusOneSecond_AndAClientOfAnotherReplicaGetsIt()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var doomed = await ReplicaAsync(etcd, "doomed");
        await using var survivor = await ReplicaAsync(etcd, "survivor");
        await using var watch = await GroupWatch.StartAsync(survivor.Client);
        await using var holder = ClientProcess.StartDmactl(doomed.Address, "hold", $"{Group}");
        await holder.WaitForLineAsync($"holding group {Group}", StartupTimeout);
        var held = await watch.WaitForAsync(Group, OwnerKind.User);

        var clock = Stopwatch.StartNew();
        doomed.Kill();
        await watch.WaitForAsync(Group, OwnerKind.None);
        var free = clock.Elapsed;
        await using var heir = ClientProcess.StartDmactl(survivor.Address, "hold", $"{Group}");
        await heir.WaitForLineAsync($"holding group {Group}", StartupTimeout);
        var regranted = await watch.WaitForAsync(Group, OwnerKind.User);

        output.WriteLine($"SIGKILL of a replica -> its group free on the other after {free.TotalMilliseconds:F0} ms (TTL {Ttl.TotalMilliseconds} ms), claimed there by a client after {clock.Elapsed.TotalMilliseconds:F0} ms");
        Assert.True(free <= Ttl + TimeSpan.FromSeconds(1), $"free after {free}, more than TTL + 1 s");
        Assert.NotEqual(held.OwnerSession, regranted.OwnerSession);
        Assert.True(regranted.Generation > held.Generation);
    }

    [Fact]
    public async Task ReplicaSigStopped_ItsGroupGoesToAnotherReplica_AndOnThawItEndsItsOwnSession()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var frozen = await ReplicaAsync(etcd, "frozen");
        await using var survivor = await ReplicaAsync(etcd, "survivor");
        await using var watch = await GroupWatch.StartAsync(survivor.Client);
        await using var frozenWatch = await GroupWatch.StartAsync(frozen.Client);
        await using var holder = ClientProcess.StartDmactl(frozen.Address, "hold", $"{Group}");
        await holder.WaitForLineAsync($"holding group {Group}", StartupTimeout);
        var held = await watch.WaitForAsync(Group, OwnerKind.User);

        var clock = Stopwatch.StartNew();
        frozen.Freeze();
        await watch.WaitForAsync(Group, OwnerKind.None);
        var free = clock.Elapsed;
        await using var heir = ClientProcess.StartDmactl(survivor.Address, "hold", $"{Group}");
        await heir.WaitForLineAsync($"holding group {Group}", StartupTimeout);
        var regranted = await watch.WaitForAsync(Group, OwnerKind.User);
        frozen.Thaw();

        // Thawed, the replica finds its lease past its deadline: it ends its session (the client is
        // told) and its table comes to show the other replica's grant.
        await holder.WaitForLineAsync("ended", StartupTimeout);
        await frozenWatch.WaitUntilAsync($"group {Group} owned by {regranted.OwnerSession}",
            g => g.TryGetValue(Group, out var x) && x.OwnerSession == regranted.OwnerSession);
        output.WriteLine($"SIGSTOP of a replica -> its group free on the other after {free.TotalMilliseconds:F0} ms (TTL {Ttl.TotalMilliseconds} ms); thawed, it ended its session and shows the new owner");
        Assert.True(free <= Ttl + TimeSpan.FromSeconds(1), $"free after {free}, more than TTL + 1 s");
    }
}
