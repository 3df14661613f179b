using System.Diagnostics;
using Etcdserverpb;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;
using Mvccpb;
using DmaBroker.Core;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;
using Xunit.Abstractions;

namespace DmaBroker.Cluster.Tests;

/// <summary>A replica cut off from etcd, its sessions fenced, and an etcd member lost (SPEC §16).</summary>
public sealed class FailureTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Ttl = TimeSpan.FromSeconds(3);

    /// <summary>
    /// SPEC §16's fencing seen from outside: a replica cut off from etcd while its session's device
    /// writes the session's memory flat out. The other replica's heir claims the group as soon as it
    /// sees it free; by then the fenced session's DMA must have stopped. The memory is the witness:
    /// as the heir's claim is sent it is copied, and it must end exactly so — had one write landed
    /// after the grant (fencing late, or none), the copy would differ. The writer's own count must
    /// match the memory too, so nothing landed unacknowledged.
    /// </summary>
    [Fact]
    public async Task ReplicaCutOffFromEtcd_ItsSessionsDmaStopsBeforeItsGroupIsFree_NoneLandsAfterAnotherReplicaIsGranted()
    {
        const ulong Iova = 0x10000;
        const int Bytes = 4096;
        await using var etcd = await EtcdCluster.StartAsync();
        await using var proxy = new TcpProxy(etcd.Endpoints[0]);
        await using var lost = await Replica.StartAsync("lost", [proxy.Endpoint], output: output);
        await using var survivor = await Replica.StartAsync("survivor", etcd.Endpoints, output: output);
        var edu = lost.Broker.Journal.Current.Devices.Values.First(d => d.Model == "edu" && d.Driver == Drivers.VfioPci);
        var group = edu.GroupId;
        var doomed = lost.Broker.Sessions.Open();
        var doomedContainer = lost.Broker.Vfio.CreateContainer(doomed, ContainerType.Type1v2);
        lost.Broker.Vfio.SetContainer(doomed, group, doomedContainer.Id);
        var block = doomed.Allocate(Bytes);
        lost.Broker.Vfio.MapDma(doomed, doomedContainer.Id, block.Vaddr, Iova, Bytes, read: true, write: true);
        var device = lost.Broker.Vfio.OpenDevice(doomed, edu.Address);
        // Config space (region 7), command register: memory space and Bus Master on (SPEC §4).
        Assert.True(device.MmioWrite(7, 4, 2, 0b110).Ok);
        var held = await ReplicaTests.WaitForGroupAsync(survivor.Broker, group, g => g.OwnerSession == doomed.Id);
        using var lostWatch = lost.Broker.Journal.Watch();
        var heir = survivor.Broker.Sessions.Open();
        var container = survivor.Broker.Vfio.CreateContainer(heir, ContainerType.Type1v2);
        var clock = Stopwatch.StartNew();
        var writer = DmaStamper.Start(device, Iova, Bytes, clock);
        await writer.Running.WaitAsync(ReplicaTests.Timeout);

        // As etcd sees it, the replica is dead: no keepalive reaches it any more.
        var ending = EndOf(lostWatch, doomed.Id);
        var cut = clock.Elapsed;
        proxy.Cut();
        var atCut = writer.Applied;
        await ReplicaTests.WaitForGroupAsync(survivor.Broker, group, g => g.OwnerKind == OwnerKind.None);
        var free = clock.Elapsed;
        var atGrant = block.Bytes.ToArray();
        survivor.Broker.Vfio.SetContainer(heir, group, container.Id);
        var claimed = clock.Elapsed;
        var granted = survivor.Broker.Journal.Current.Groups[group];

        // The cut-off replica stopped its session's DMA on its own, before etcd freed the group,
        // and none of it landed after the other replica's grant.
        (long Last, TimeSpan LastAt, string Refusal) stopped;
        try
        {
            stopped = await writer.Stopped.WaitAsync(ReplicaTests.Timeout);
        }
        catch (TimeoutException)
        {
            throw new Xunit.Sdk.XunitException($"the fenced session's device still wrote {ReplicaTests.Timeout.TotalSeconds} s after the other replica's grant: write {writer.Applied} landed, memory held {DmaStamps.LastIn(atGrant)} when the claim was sent");
        }
        var (last, lastAt, refusal) = stopped;
        var ended = await ending;
        Assert.True(last > atCut, $"the session's device wrote {atCut} times before the cut and no more while cut off");
        Assert.True(DmaStamps.LastIn(block.Bytes) == DmaStamps.LastIn(atGrant),
            $"writes {DmaStamps.LastIn(atGrant) + 1} to {DmaStamps.LastIn(block.Bytes)} of the fenced session landed after the other replica's claim was sent");
        Assert.Equal(atGrant, block.Bytes);
        Assert.Equal(writer.Expected(last), block.Bytes);
        Assert.True(lastAt < free, $"the fenced session's last DMA landed at {lastAt.TotalMilliseconds:F0} ms, after its group was free on the other replica at {free.TotalMilliseconds:F0} ms");
        Assert.True(ended < free, $"the cut-off replica ended its session at {ended.TotalMilliseconds:F0} ms, after the group was free at {free.TotalMilliseconds:F0} ms");
        Assert.True(free - cut <= Ttl + TimeSpan.FromSeconds(1), $"free {(free - cut).TotalMilliseconds:F0} ms after the cut; the lease TTL is {Ttl.TotalMilliseconds} ms");
        Assert.Equal(heir.Id, granted.OwnerSession);
        Assert.True(granted.Generation > held.Generation, $"the heir's grant (etcd revision {granted.Generation}) after the fenced session's ({held.Generation})");
        output.WriteLine($"cut off at {cut.TotalMilliseconds:F0} ms while DMA ran flat out ({atCut} writes by then) -> last of {last} writes landed at {lastAt.TotalMilliseconds:F0} ms (then refused: {refusal}), session ended at {ended.TotalMilliseconds:F0} ms, group free on the other replica at {free.TotalMilliseconds:F0} ms, granted there (etcd revision {granted.Generation}) by {claimed.TotalMilliseconds:F0} ms; memory unchanged since (TTL {Ttl.TotalMilliseconds} ms)");

        async Task<TimeSpan> EndOf(TopologyWatcher watcher, ulong session)
        {
            using var cts = new CancellationTokenSource(ReplicaTests.Timeout);
            await foreach (var ev in watcher.ReadAllAsync(cts.Token))
            {
                if (ev.Change is SessionEnded e && e.SessionId == session)
                    return clock.Elapsed;
            }
            throw new TimeoutException();
        }
    }

    [Fact]
    public async Task KeepaliveFails_SessionsDmaStops_BeforeTheLeaseCanHaveExpired()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var proxy = new TcpProxy(etcd.Endpoints[0]);
        var clock = new FakeTimeProvider(DateTimeOffset.UtcNow);
        await using var replica = await Replica.StartAsync("fenced", [proxy.Endpoint], clock, Ttl);
        var broker = replica.Broker;
        var edu = broker.Journal.Current.Devices.Values.First(d => d.Model == "edu" && d.Driver == Drivers.VfioPci);
        var session = broker.Sessions.Open();
        var container = broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        broker.Vfio.SetContainer(session, edu.GroupId, container.Id);
        var granted = clock.GetTimestamp(); // the lease was granted now, on the broker's clock
        var block = session.Allocate(4096);
        broker.Vfio.MapDma(session, container.Id, block.Vaddr, 0x10000, 4096, read: true, write: true);
        var handle = broker.Vfio.OpenDevice(session, edu.Address);
        // Config space (region 7), command register: memory space and Bus Master on (SPEC §4).
        Assert.True(handle.MmioWrite(7, 4, 2, 0b110).Ok);
        Assert.True(handle.DmaWrite(0x10000, [1, 2, 3]).Ok);
        using var watcher = broker.Journal.Watch();

        proxy.Cut();
        // The broker's clock runs on, a keepalive tick at a time, to the fencing point: the TTL
        // less the safety margin after the last renewal etcd confirmed (the grant).
        var tick = Ttl / 6;
        while (clock.GetElapsedTime(granted) < Ttl - Ttl / 3)
            clock.Advance(tick);
        using var cts = new CancellationTokenSource(ReplicaTests.Timeout);
        await foreach (var ev in watcher.ReadAllAsync(cts.Token))
        {
            if (ev.Change is SessionEnded e && e.SessionId == session.Id)
                break;
        }

        // The session has ended, its DMA refused, its group released here, and all of it while
        // etcd could not yet have expired its lease: no other replica can have been granted the group.
        var at = clock.GetElapsedTime(granted);
        Assert.True(at < Ttl, $"fenced at {at.TotalMilliseconds} ms on the broker's clock; the lease could expire at {Ttl.TotalMilliseconds} ms");
        var refused = Assert.Throws<ErrnoException>(() => handle.DmaWrite(0x10000, [4, 5, 6]));
        Assert.Equal(Errno.EACCES, refused.Errno);
        Assert.Equal(OwnerKind.None, broker.Journal.Current.Groups[edu.GroupId].OwnerKind);
        output.WriteLine($"keepalives cut at 0 ms -> session fenced, DMA refused and group released at {at.TotalMilliseconds} ms on the broker's clock (TTL {Ttl.TotalMilliseconds} ms)");
    }

    /// <summary>
    /// etcd's watch on a member cut off from the others' majority delivers nothing, silently, while
    /// the others go on. The replica's watch asks for a leader, so the member ends it once it has
    /// none; the replica watches again through another member and sees the changes made meanwhile,
    /// while the member is still cut off.
    /// </summary>
    [Fact]
    public async Task WatchedMember_CutOffFromTheOthers_TheReplicaWatchesThroughAnother_AndSeesTheirChanges()
    {
        await using var etcd = await EtcdCluster.StartAsync(size: 3, peerLinks: true);
        await using var second = new TcpProxy(etcd.Endpoints[1]);
        // Until the replica has started, its calls (its watch with them) can reach m0 alone.
        second.Cut();
        await using var a = await Replica.StartAsync("a", [etcd.Endpoints[0], second.Endpoint], ttl: TimeSpan.FromSeconds(30), output: output);
        second.Heal();
        await using var b = await Replica.StartAsync("b", [etcd.Endpoints[1], etcd.Endpoints[2]], ttl: TimeSpan.FromSeconds(30), output: output);
        var group = ReplicaTests.FreeGroups(a.Broker)[0];

        etcd.Isolate(0);

        // The other two elect a leader if m0 was it (a claim may be refused EAGAIN meanwhile).
        var session = b.Broker.Sessions.Open();
        var container = b.Broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        var clock = Stopwatch.StartNew();
        while (true)
        {
            try
            {
                b.Broker.Vfio.SetContainer(session, group, container.Id);
                break;
            }
            catch (ErrnoException e) when (e.Errno == Errno.EAGAIN && clock.Elapsed < ReplicaTests.Timeout)
            {
                await Task.Yield();
            }
        }
        var seen = await ReplicaTests.WaitForGroupAsync(a.Broker, group, g => g.OwnerKind == OwnerKind.User);

        Assert.Equal(session.Id, seen.OwnerSession);
        output.WriteLine($"m0 cut off from the other members; b's claim seen on a (which watched m0) {clock.Elapsed.TotalMilliseconds:F0} ms later");
    }

    /// <summary>
    /// A replica cut off from etcd for longer than its leases: its registration (its name in the
    /// cluster) expires with them. Once healed it takes its name again, so no other broker can start
    /// under it, and it serves claims again.
    /// </summary>
    [Fact]
    public async Task ReplicaCutOffLongerThanItsLease_OnceHealed_TakesItsNameAgain_AndServesClaims()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var proxy = new TcpProxy(etcd.Endpoints[0]);
        // The claim below may come before a has read etcd's answer to the renewal it waits for: a
        // long deadline, so that a loaded machine delaying that answer does not refuse it EAGAIN.
        await using var a = await Replica.StartAsync("a", [proxy.Endpoint], ttl: Ttl, output: output, callTimeout: TimeSpan.FromSeconds(10));
        using var channel = GrpcChannel.ForAddress(etcd.Endpoints[0]);
        using var cts = new CancellationTokenSource(ReplicaTests.Timeout);
        using var watch = await WatchNameAsync(channel, cts.Token);

        proxy.Cut();
        var expired = await NextEventAsync(watch, cts.Token);
        Assert.Equal(Event.Types.EventType.Delete, expired.Type);
        proxy.Heal();

        var renewed = await NextEventAsync(watch, cts.Token);
        Assert.Equal(Event.Types.EventType.Put, renewed.Type);
        var refused = await Assert.ThrowsAsync<ErrnoException>(() => Replica.StartAsync("a", etcd.Endpoints));
        Assert.Equal(Errno.EEXIST, refused.Errno);
        var group = ReplicaTests.FreeGroups(a.Broker)[0];
        var session = ReplicaTests.Claim(a.Broker, group);
        Assert.Equal(session.Id, a.Broker.Journal.Current.Groups[group].OwnerSession);
    }

    /// <summary>
    /// A renewal of the registration whose transaction committed but went unanswered (so the next
    /// attempt, on a new lease, finds the name's key on the lease of the one before): the key is
    /// this replica's all the same, by the process's mark in it, and moves to the new lease, and
    /// the stray lease is revoked. Before, the replica took its own name for another broker's and
    /// refused every claim EEXIST for good. The unanswered attempt is made here by hand: the name
    /// put back, while the replica is cut off, as its value was, on a lease the replica never learnt of.
    /// </summary>
    [Fact]
    public async Task RenewalWhoseAttemptCommittedUnanswered_IsRecognisedAsTheReplicasOwn_AndServesClaims()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var proxy = new TcpProxy(etcd.Endpoints[0]);
        await using var a = await Replica.StartAsync("a", [proxy.Endpoint], ttl: Ttl, output: output, callTimeout: TimeSpan.FromSeconds(10));
        using var channel = GrpcChannel.ForAddress(etcd.Endpoints[0]);
        var kv = new KV.KVClient(channel);
        var leases = new Lease.LeaseClient(channel);
        using var cts = new CancellationTokenSource(ReplicaTests.Timeout);
        using var watch = await WatchNameAsync(channel, cts.Token);
        var registered = (await kv.RangeAsync(new RangeRequest { Key = Name })).Kvs.Single();

        proxy.Cut();
        Assert.Equal(Event.Types.EventType.Delete, (await NextEventAsync(watch, cts.Token)).Type);
        var stray = await leases.LeaseGrantAsync(new LeaseGrantRequest { TTL = 60 });
        await kv.PutAsync(new PutRequest { Key = Name, Value = registered.Value, Lease = stray.ID });
        Assert.Equal(stray.ID, (await NextEventAsync(watch, cts.Token)).Kv.Lease);
        proxy.Heal();

        var moved = await NextEventAsync(watch, cts.Token);
        Assert.Equal(Event.Types.EventType.Put, moved.Type);
        Assert.NotEqual(stray.ID, moved.Kv.Lease);
        Assert.Equal(registered.Value, moved.Kv.Value);
        var group = ReplicaTests.FreeGroups(a.Broker)[0];
        var session = ReplicaTests.Claim(a.Broker, group);
        Assert.Equal(session.Id, a.Broker.Journal.Current.Groups[group].OwnerSession);
        // The claim waited for the renewal, which revoked the stray lease before it ended.
        Assert.Equal(-1, (await leases.LeaseTimeToLiveAsync(new LeaseTimeToLiveRequest { ID = stray.ID })).TTL);
    }

    // Replica a's name in the cluster.
    private static readonly ByteString Name = ByteString.CopyFromUtf8("/dmabroker/replicas/a");

    // A watch on replica a's name, created.
    private static async Task<AsyncDuplexStreamingCall<WatchRequest, WatchResponse>> WatchNameAsync(GrpcChannel channel, CancellationToken cancellationToken)
    {
        var watch = new Watch.WatchClient(channel).Watch(cancellationToken: cancellationToken);
        await watch.RequestStream.WriteAsync(new WatchRequest { CreateRequest = new WatchCreateRequest { Key = Name } }, cancellationToken);
        Assert.True(await watch.ResponseStream.MoveNext(cancellationToken) && watch.ResponseStream.Current.Created);
        return watch;
    }

    // The next event of a watch on one key.
    private static async Task<Event> NextEventAsync(AsyncDuplexStreamingCall<WatchRequest, WatchResponse> watch, CancellationToken cancellationToken)
    {
        while (await watch.ResponseStream.MoveNext(cancellationToken))
        {
            if (watch.ResponseStream.Current.Events.FirstOrDefault() is { } ev)
                return ev;
        }
        throw new TimeoutException();
    }

    [Fact]
    public async Task OneEtcdMemberKilled_TheClusterKeepsServing()
    {
        await using var etcd = await EtcdCluster.StartAsync(size: 3);
        await using var a = await Replica.StartAsync("a", etcd.Endpoints, output: output);
        await using var b = await Replica.StartAsync("b", etcd.Endpoints, output: output);
        var group = ReplicaTests.FreeGroups(a.Broker)[0];
        var before = a.Broker.Sessions.Open();
        a.Broker.Vfio.SetContainer(before, group, a.Broker.Vfio.CreateContainer(before, ContainerType.Type1v2).Id);
        await ReplicaTests.WaitForGroupAsync(b.Broker, group, g => g.OwnerSession == before.Id);
        a.Broker.Vfio.UnsetContainer(before, group);
        await ReplicaTests.WaitForGroupAsync(b.Broker, group, g => g.OwnerKind == OwnerKind.None);

        await etcd.KillAsync(0);

        // Claims and releases go on through the two members left (a leader election may refuse a
        // few with EAGAIN meanwhile), and the other replica's watch follows every one.
        var session = b.Broker.Sessions.Open();
        var container = b.Broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        var retries = 0;
        for (var round = 0; round < 10; round++)
        {
            while (true)
            {
                try
                {
                    b.Broker.Vfio.SetContainer(session, group, container.Id);
                    break;
                }
                catch (ErrnoException e) when (e.Errno == Errno.EAGAIN && retries < 100)
                {
                    retries++;
                    await Task.Yield();
                }
            }
            await ReplicaTests.WaitForGroupAsync(a.Broker, group, g => g.OwnerSession == session.Id);
            b.Broker.Vfio.UnsetContainer(session, group);
            await ReplicaTests.WaitForGroupAsync(a.Broker, group, g => g.OwnerKind == OwnerKind.None);
        }
        output.WriteLine($"member m0 killed: 10 claims and releases through the other two, seen by the other replica; {retries} EAGAIN retries");
    }
}
