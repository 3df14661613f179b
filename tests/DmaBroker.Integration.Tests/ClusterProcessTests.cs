using System.Diagnostics;
using DmaBroker.Client;
using DmaBroker.Cluster.Tests;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Xunit.Abstractions;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// Broker replicas as processes of their own on one real etcd (SPEC §16), a client holding a group
/// on one of them; the replica is killed (SIGKILL) or frozen (SIGSTOP), and a client of the other
/// replica must get the group within the lease TTL + 1 s; a frozen replica's session, DMA-ing when
/// frozen, must apply none of it once thawed.
/// </summary>
public sealed class ClusterProcessTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Ttl = TimeSpan.FromSeconds(3);
    private static readonly TimeSpan StartupTimeout = TimeSpan.FromSeconds(30);
    private const uint Group = 16;

    /// <summary>A connection to the frozen replica that no keepalive verdict ends while it is frozen.</summary>
    private static readonly BrokerClientOptions OutlivesTheFreeze = new() { KeepAliveTimeout = TimeSpan.FromMinutes(1) };

    [Fact]
    public async Task ReplicaSigKilled_ItsGroupIsFreeWithinTtlPlusOneSecond_AndAClientOfAnotherReplicaGetsIt()
    {
        await using var rig = await Rig.StartAsync();
        await rig.HoldWithDmactlAsync();

        var (free, held, regranted, heir) = await rig.TakeOverAsync(() =>
        {
            rig.Holding.Kill();
            return Task.CompletedTask;
        });
        await using (heir)
        {
            output.WriteLine($"SIGKILL of a replica -> its group free on the other after {free.TotalMilliseconds:F0} ms (TTL {Ttl.TotalMilliseconds} ms)");
            Assert.True(free <= Ttl + TimeSpan.FromSeconds(1), $"free after {free}, more than TTL + 1 s");
            Assert.NotEqual(held.OwnerSession, regranted.OwnerSession);
            Assert.True(regranted.Generation > held.Generation);
        }
    }

    /// <summary>
    /// SIGSTOP freezes the replica while its session's device writes the session's shared memory
    /// flat out (SPEC §15: the client maps the same pages), each write stamping a number of its
    /// own. Frozen, the replica can write nothing: the memory is copied then, and the other
    /// replica's client is granted the group. Thawed, the replica finds its lease past its deadline
    /// and must apply none of the writes it still has queued: the memory must stay the copy.
    /// </summary>
    [Fact]
    public async Task ReplicaSigStopped_ItsGroupGoesToAnotherReplica_AndOnThawItAppliesNoMoreDmaAndEndsItsOwnSession()
    {
        await using var rig = await Rig.StartAsync();
        // The watch of the frozen replica must outlive the freeze, which lasts the lease TTL plus a
        // dmactl's start on the other replica: with the client's default keepalive (a ping
        // unanswered for 3 s ends the connection) it broke whenever that start was slow.
        using var frozenClient = BrokerClient.Connect(rig.Holding.Address, OutlivesTheFreeze);
        await using var frozenWatch = await GroupWatch.StartAsync(frozenClient);
        await using var stamper = await SharedDmaStamper.StartAsync(rig.HoldingUnix, FreeEduDevices.All.Single(d => d.Group == Group).Address, Group);
        await stamper.WaitForWritesAsync();
        byte[]? frozen = null;

        var (free, _, regranted, heir) = await rig.TakeOverAsync(async () =>
        {
            rig.Holding.Freeze();
            await rig.Holding.WaitUntilFrozenAsync();
            frozen = stamper.Memory;
        });
        await using (heir)
        {
            rig.Holding.Thaw();

            // Thawed, the replica finds its lease past its deadline: it ends its session, and its
            // table comes to show the other replica's grant.
            await frozenWatch.WaitForSessionEndedAsync(stamper.SessionId);
            await frozenWatch.WaitUntilAsync($"group {Group} owned by {regranted.OwnerSession}",
                g => g.TryGetValue(Group, out var x) && x.OwnerSession == regranted.OwnerSession);
            var after = stamper.Memory;
            var (sent, acknowledged, blocked) = await stamper.StopAsync();
            var landed = DmaStamps.LastIn(frozen!);
            output.WriteLine($"SIGSTOP of a replica while its session's device wrote flat out ({sent} writes sent, {acknowledged} acknowledged, write {landed} the last in memory when frozen) -> its group free on the other after {free.TotalMilliseconds:F0} ms (TTL {Ttl.TotalMilliseconds} ms) and granted there; thawed, it ended its session and shows the new owner; {blocked} writes it still had were refused BLOCKED by the DMA fence, the memory is {(after.AsSpan().SequenceEqual(frozen) ? "unchanged" : "CHANGED")} since the freeze");
            Assert.True(landed > 0, "the device wrote nothing before the freeze");
            Assert.True(DmaStamps.LastIn(after) == landed,
                $"writes up to {DmaStamps.LastIn(after)} landed after the freeze, when write {landed} was the last in memory and the group went to another replica's session");
            Assert.Equal(frozen, after);
            Assert.True(free <= Ttl + TimeSpan.FromSeconds(1), $"free after {free}, more than TTL + 1 s");
        }
    }

    /// <summary>
    /// A session on a replica, over its Unix socket, whose edu device writes one page of shared
    /// memory flat out from several pipelined writers, each write stamped (<see cref="DmaStamps"/>),
    /// so every write that lands changes the page.
    /// </summary>
    private sealed class SharedDmaStamper : IAsyncDisposable
    {
        private const ulong Iova = 0x10_0000;
        private const int Slots = 4096 / DmaStamps.Size;
        private const int Writers = 32;
        // Writes acknowledged before the replica is frozen: the device has been writing a while.
        private const long WarmUp = 2000;
        private readonly BrokerClient _client;
        private readonly BrokerSession _session;
        private readonly DmaBuffer _buffer;
        private readonly DmaChannel _dma;
        private readonly CancellationTokenSource _stop = new();
        private readonly TaskCompletionSource _landed = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly Task _writers;
        private long _sent;
        private long _acknowledged;
        private long _blocked;

        private SharedDmaStamper(BrokerClient client, BrokerSession session, DmaBuffer buffer, DmaChannel dma)
        {
            _client = client;
            _session = session;
            _buffer = buffer;
            _dma = dma;
            _writers = Task.WhenAll(Enumerable.Range(0, Writers).Select(_ => Task.Run(WriteAsync)));
        }

        public ulong SessionId => _session.Id;

        /// <summary>A copy of the page as it is now.</summary>
        public byte[] Memory => _buffer.Span.ToArray();

        public static async Task<SharedDmaStamper> StartAsync(string unixAddress, string device, uint group)
        {
            // The connection outlives the freeze (no keepalive verdict within it), so that the writes
            // in flight then are still there for the replica to take up when it is thawed.
            var client = BrokerClient.Connect(unixAddress, OutlivesTheFreeze);
            try
            {
                var session = await client.OpenSessionAsync("stamper");
                var container = await session.NewContainerAsync(ContainerType.Type1V2);
                await container.SetGroupAsync(group);
                var buffer = await session.AllocateAsync(4096, shared: true);
                await container.MapAsync(buffer, Iova);
                var edu = await session.OpenDeviceAsync(device);
                await edu.EnableBusMasterAsync();
                return new SharedDmaStamper(client, session, buffer, await edu.OpenDmaChannelAsync());
            }
            catch
            {
                client.Dispose();
                throw;
            }
        }

        /// <summary>Waits until <see cref="WarmUp"/> of the device's writes have landed in the page.</summary>
        public Task WaitForWritesAsync() => _landed.Task.WaitAsync(GroupWatch.DefaultTimeout);

        /// <summary>Stops the writers (the broker refused them already, or they are cancelled now); returns the writes sent, acknowledged, and refused as BLOCKED (fenced).</summary>
        public async Task<(long Sent, long Acknowledged, long Blocked)> StopAsync()
        {
            await _stop.CancelAsync();
            await _writers.WaitAsync(GroupWatch.DefaultTimeout);
            return (Interlocked.Read(ref _sent), Interlocked.Read(ref _acknowledged), Interlocked.Read(ref _blocked));
        }

        private async Task WriteAsync()
        {
            var stamp = new byte[DmaStamps.Size];
            try
            {
                while (!_stop.IsCancellationRequested)
                {
                    var n = Interlocked.Increment(ref _sent);
                    DmaStamps.Stamp(stamp, n);
                    var result = await _dma.WriteAsync(Iova + DmaStamps.Offset(n, Slots), stamp, _stop.Token);
                    if (!result.Ok)
                    {
                        // Fenced (BLOCKED), or the session ended under it: the writer stops.
                        if (result.Fault?.Reason == FaultReason.Blocked)
                            Interlocked.Increment(ref _blocked);
                        return;
                    }
                    if (Interlocked.Increment(ref _acknowledged) >= WarmUp)
                        _landed.TrySetResult();
                }
            }
            catch (Exception e) when (e is BrokerException or RpcException or OperationCanceledException or ObjectDisposedException or InvalidOperationException)
            {
                // The channel broke with the session, or the test stopped the writers.
            }
        }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            await _writers.WaitAsync(GroupWatch.DefaultTimeout);
            await _dma.DisposeAsync();
            await _session.DisposeAsync();
            _client.Dispose();
            _stop.Dispose();
        }
    }

    /// <summary>
    /// etcd, two replicas (the holding one also on a Unix socket, for shared memory), a watch of
    /// the survivor, and what holds the group on the other: a dmactl, or the test's own session.
    /// </summary>
    private sealed class Rig(EtcdCluster etcd, LiveBroker holding, LiveBroker survivor, GroupWatch watch, string socketDirectory) : IAsyncDisposable
    {
        private ClientProcess? _holder;

        public LiveBroker Holding { get; } = holding;

        /// <summary>The holding replica's Unix socket address.</summary>
        public string HoldingUnix => $"unix://{Path.Combine(socketDirectory, "holding.sock")}";

        public static async Task<Rig> StartAsync()
        {
            var etcd = await EtcdCluster.StartAsync();
            var sockets = Directory.CreateTempSubdirectory("dmabroker-cluster-").FullName;
            var started = new List<IAsyncDisposable> { etcd };
            try
            {
                var holding = await ReplicaAsync(etcd, "holding", started, "--listen", $"unix://{Path.Combine(sockets, "holding.sock")}");
                var survivor = await ReplicaAsync(etcd, "survivor", started);
                var watch = await GroupWatch.StartAsync(survivor.Client);
                return new Rig(etcd, holding, survivor, watch, sockets);
            }
            catch
            {
                foreach (var s in started)
                    await s.DisposeAsync();
                Directory.Delete(sockets, recursive: true);
                throw;
            }
        }

        private static async Task<LiveBroker> ReplicaAsync(EtcdCluster etcd, string name, List<IAsyncDisposable> started, params string[] more)
        {
            var broker = await LiveBroker.StartAsync([
                "--cluster", "etcd", "--etcd-endpoints", string.Join(",", etcd.Endpoints.Select(e => e.GetLeftPart(UriPartial.Authority))),
                "--replica", name, "--lease-ttl-ms", ((int)Ttl.TotalMilliseconds).ToString(System.Globalization.CultureInfo.InvariantCulture), .. more]);
            started.Insert(0, broker);
            return broker;
        }

        /// <summary>A dmactl on the holding replica takes the group and holds it.</summary>
        public async Task HoldWithDmactlAsync()
        {
            _holder = ClientProcess.StartDmactl(Holding.Address, "hold", $"{Group}");
            await _holder.WaitForLineAsync($"holding group {Group}", StartupTimeout);
            await watch.WaitForAsync(Group, OwnerKind.User);
        }

        /// <summary>Cuts the holding replica off by <paramref name="cut"/>; a client of the survivor then claims the group.</summary>
        public async Task<(TimeSpan Free, Group Held, Group Regranted, ClientProcess Heir)> TakeOverAsync(Func<Task> cut)
        {
            var held = await watch.WaitForAsync(Group, OwnerKind.User);
            var clock = Stopwatch.StartNew();
            await cut();
            await watch.WaitForAsync(Group, OwnerKind.None);
            var free = clock.Elapsed;
            var heir = ClientProcess.StartDmactl(survivor.Address, "hold", $"{Group}");
            await heir.WaitForLineAsync($"holding group {Group}", StartupTimeout);
            return (free, held, await watch.WaitForAsync(Group, OwnerKind.User), heir);
        }

        public async ValueTask DisposeAsync()
        {
            if (_holder is not null)
                await _holder.DisposeAsync();
            await watch.DisposeAsync();
            await survivor.DisposeAsync();
            await Holding.DisposeAsync();
            await etcd.DisposeAsync();
            Directory.Delete(socketDirectory, recursive: true);
        }
    }
}
