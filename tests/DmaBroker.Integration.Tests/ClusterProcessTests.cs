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

    [Fact]
    public async Task ReplicaSigKilled_ItsGroupIsFreeWithinTtlPlusOneSecond_AndAClientOfAnotherReplicaGetsIt()
    {
        await using var rig = await Rig.StartAsync();

        var (free, held, regranted, heir) = await rig.TakeOverAsync(rig.Holding.Kill);
        await using (heir)
        {
            output.WriteLine($"SIGKILL of a replica -> its group free on the other after {free.TotalMilliseconds:F0} ms (TTL {Ttl.TotalMilliseconds} ms)");
            Assert.True(free <= Ttl + TimeSpan.FromSeconds(1), $"free after {free}, more than TTL + 1 s");
            Assert.NotEqual(held.OwnerSession, regranted.OwnerSession);
            Assert.True(regranted.Generation > held.Generation);
        }
    }

    [Fact]
    public async Task ReplicaSigStopped_ItsGroupGoesToAnotherReplica_AndOnThawItEndsItsOwnSession()
    {
        await using var rig = await Rig.StartAsync();
        await using var frozenWatch = await GroupWatch.StartAsync(rig.Holding.Client);

        var (free, _, regranted, heir) = await rig.TakeOverAsync(rig.Holding.Freeze);
        await using (heir)
        {
            rig.Holding.Thaw();

            // Thawed, the replica finds its lease past its deadline: it ends its session (the
            // client is told) and its table comes to show the other replica's grant.
            await rig.Holder.WaitForLineAsync("ended", StartupTimeout);
            await frozenWatch.WaitUntilAsync($"group {Group} owned by {regranted.OwnerSession}",
                g => g.TryGetValue(Group, out var x) && x.OwnerSession == regranted.OwnerSession);
            output.WriteLine($"SIGSTOP of a replica -> its group free on the other after {free.TotalMilliseconds:F0} ms (TTL {Ttl.TotalMilliseconds} ms); thawed, it ended its session and shows the new owner");
            Assert.True(free <= Ttl + TimeSpan.FromSeconds(1), $"free after {free}, more than TTL + 1 s");
        }
    }

    /// <summary>etcd, two replicas, a watch of the survivor, and a dmactl holding the group on the other.</summary>
    private sealed class Rig(EtcdCluster etcd, LiveBroker holding, LiveBroker survivor, GroupWatch watch, ClientProcess holder) : IAsyncDisposable
    {
        public LiveBroker Holding { get; } = holding;
        public ClientProcess Holder { get; } = holder;

        public static async Task<Rig> StartAsync()
        {
            var etcd = await EtcdCluster.StartAsync();
            var started = new List<IAsyncDisposable> { etcd };
            try
            {
                var holding = await ReplicaAsync(etcd, "holding", started);
                var survivor = await ReplicaAsync(etcd, "survivor", started);
                var watch = await GroupWatch.StartAsync(survivor.Client);
                started.Insert(0, watch);
                var holder = ClientProcess.StartDmactl(holding.Address, "hold", $"{Group}");
                started.Insert(0, holder);
                await holder.WaitForLineAsync($"holding group {Group}", StartupTimeout);
                await watch.WaitForAsync(Group, OwnerKind.User);
                return new Rig(etcd, holding, survivor, watch, holder);
            }
            catch
            {
                foreach (var s in started)
                    await s.DisposeAsync();
                throw;
            }
        }

        private static async Task<LiveBroker> ReplicaAsync(EtcdCluster etcd, string name, List<IAsyncDisposable> started)
        {
            var broker = await LiveBroker.StartAsync(
                "--cluster", "etcd", "--etcd-endpoints", string.Join(",", etcd.Endpoints.Select(e => e.GetLeftPart(UriPartial.Authority))),
                "--replica", name, "--lease-ttl-ms", ((int)Ttl.TotalMilliseconds).ToString(System.Globalization.CultureInfo.InvariantCulture));
            started.Insert(0, broker);
            return broker;
        }

        /// <summary>Cuts the holding replica off by <paramref name="cut"/>; a client of the survivor then claims the group.</summary>
        public async Task<(TimeSpan Free, Group Held, Group Regranted, ClientProcess Heir)> TakeOverAsync(Action cut)
        {
            var held = await watch.WaitForAsync(Group, OwnerKind.User);
            var clock = Stopwatch.StartNew();
            cut();
            await watch.WaitForAsync(Group, OwnerKind.None);
            var free = clock.Elapsed;
            var heir = ClientProcess.StartDmactl(survivor.Address, "hold", $"{Group}");
            await heir.WaitForLineAsync($"holding group {Group}", StartupTimeout);
            return (free, held, await watch.WaitForAsync(Group, OwnerKind.User), heir);
        }

        public async ValueTask DisposeAsync()
        {
            await Holder.DisposeAsync();
            await watch.DisposeAsync();
            await survivor.DisposeAsync();
            await Holding.DisposeAsync();
            await etcd.DisposeAsync();
        }
    }
}
