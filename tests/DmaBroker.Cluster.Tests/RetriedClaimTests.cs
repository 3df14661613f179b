using DmaBroker.Core;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Etcdserverpb;
using Google.Protobuf;
using Grpc.Net.Client;
using Xunit.Abstractions;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// A claim whose first attempt committed in etcd but whose answer was lost (the client retries a
/// call etcd did not answer in time) is refused on the retry by its own compare: the store must
/// recognise its own write and let the claim stand, or etcd would own the group for the session
/// while the table says free.
/// </summary>
public sealed class RetriedClaimTests(ITestOutputHelper output)
{
    [Fact]
    public async Task Claim_WhoseEarlierAttemptCommitted_Stands_AnythingElseIsStillRefused()
    {
        await using var rig = await Rig.StartAsync();
        var (etcd, a, groups, session, container) = (rig.Etcd, rig.A, rig.Groups, rig.Session, rig.Container);
        using var channel = GrpcChannel.ForAddress(etcd.Endpoints[0]);
        var kv = new KV.KVClient(channel);
        var lease = (await kv.RangeAsync(new RangeRequest { Key = ByteString.CopyFromUtf8($"/dmabroker/sessions/{session.Id}") })).Kvs.Single().Lease;

        // What the claim of groups[1] writes, as if an attempt of it had committed unanswered. The
        // replica's watch takes its own records for already in its table: the group shows free.
        var committed = await kv.PutAsync(new PutRequest { Key = GroupRecord.Key(groups[1]), Value = new GroupRecord(session.Id, "a", 1).Encode(), Lease = lease });
        Assert.Equal(OwnerKind.None, a.Broker.Journal.Current.Groups[groups[1]].OwnerKind);

        a.Broker.Vfio.SetContainer(session, groups[1], container.Id);

        var claimed = a.Broker.Journal.Current.Groups[groups[1]];
        Assert.Equal((OwnerKind.User, session.Id, (ulong)committed.Header.Revision), (claimed.OwnerKind, claimed.OwnerSession, claimed.Generation));

        // Another session's record on the same lease, or the session's own on no lease, is not this claim's write.
        await kv.PutAsync(new PutRequest { Key = GroupRecord.Key(groups[2]), Value = new GroupRecord(session.Id + 1, "a", 1).Encode(), Lease = lease });
        await kv.PutAsync(new PutRequest { Key = GroupRecord.Key(groups[3]), Value = new GroupRecord(session.Id, "a", 1).Encode() });
        foreach (var other in groups[2..4])
        {
            Assert.Equal(Errno.EPERM, Assert.Throws<ErrnoException>(() => a.Broker.Vfio.SetContainer(session, other, container.Id)).Errno);
            Assert.Equal(OwnerKind.None, a.Broker.Journal.Current.Groups[other].OwnerKind);
        }
    }

    /// <summary>
    /// A claim whose only attempt committed in etcd but went unanswered (etcd applied it; the answer
    /// never came back before the deadline): the client is told EAGAIN and its table says free, so
    /// etcd must not keep the group the session's. Once etcd answers again the replica takes its
    /// write back on its own, without the client retrying: the group goes free on every replica and
    /// another replica's session can claim it.
    /// </summary>
    [Fact]
    public async Task Claim_WhoseOnlyAttemptCommittedUnanswered_FailsEagain_AndIsTakenBack_SoTheGroupIsNotStuck()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var proxy = new TcpProxy(etcd.Endpoints[0]);
        // The premise is that etcd commits the held claim before a's deadline: a deadline of 10 s
        // leaves room for a loaded machine delaying etcd; the TTL of 60 s keeps a's leases (whose
        // keepalive answers are held too) far from the keeper's fencing margin meanwhile.
        await using var a = await Replica.StartAsync("a", [proxy.Endpoint], ttl: LongTtl, output: output, callTimeout: LongCall);
        await using var b = await Replica.StartAsync("b", etcd.Endpoints, ttl: LongTtl, output: output, callTimeout: LongCall);
        var groups = ReplicaTests.FreeGroups(a.Broker);
        var session = a.Broker.Sessions.Open("unanswered");
        var container = a.Broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        // The session holds a group already, so it has its etcd lease: the claim below is one transaction.
        a.Broker.Vfio.SetContainer(session, groups[0], container.Id);

        proxy.HoldAnswers();
        var claim = Task.Run(() => a.Broker.Vfio.SetContainer(session, groups[1], container.Id));
        // It commits all the same: b's watch (straight to etcd) shows the session's record.
        await PremiseAsync(ReplicaTests.WaitForGroupAsync(b.Broker, groups[1], g => g.OwnerSession == session.Id),
            "etcd did not commit the held claim");
        var refused = await Assert.ThrowsAsync<ErrnoException>(() => claim);
        Assert.Equal(Errno.EAGAIN, refused.Errno);
        Assert.Equal(OwnerKind.None, a.Broker.Journal.Current.Groups[groups[1]].OwnerKind);

        proxy.ReleaseAnswers();

        await ReplicaTests.WaitForGroupAsync(b.Broker, groups[1], g => g.OwnerKind == OwnerKind.None);
        var heir = ReplicaTests.Claim(b.Broker, groups[1], "heir");
        var granted = await ReplicaTests.WaitForGroupAsync(a.Broker, groups[1], g => g.OwnerKind == OwnerKind.User);
        Assert.Equal(heir.Id, granted.OwnerSession);
        // The session's other group was never touched.
        Assert.Equal(session.Id, a.Broker.Journal.Current.Groups[groups[0]].OwnerSession);
        Assert.Equal(session.Id, b.Broker.Journal.Current.Groups[groups[0]].OwnerSession);
    }

    /// <summary>
    /// A release etcd did not record (the replica cut off from it): the table releases anyway, and
    /// etcd must not keep the group the session's, which nobody could claim until the session ended.
    /// Once etcd answers again the replica deletes the session's record of the group on its own.
    /// </summary>
    [Fact]
    public async Task Release_EtcdDidNotRecord_IsSettledOnceEtcdAnswers_SoTheGroupIsNotStuck()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        await using var proxy = new TcpProxy(etcd.Endpoints[0]);
        await using var a = await Replica.StartAsync("a", [proxy.Endpoint], ttl: LongTtl, output: output, callTimeout: LongCall);
        await using var b = await Replica.StartAsync("b", etcd.Endpoints, ttl: LongTtl, output: output, callTimeout: LongCall);
        var group = ReplicaTests.FreeGroups(a.Broker)[0];
        var session = ReplicaTests.Claim(a.Broker, group, "unrecorded");
        await ReplicaTests.WaitForGroupAsync(b.Broker, group, g => g.OwnerSession == session.Id);

        proxy.Cut();
        a.Broker.Vfio.UnsetContainer(session, group);
        Assert.Equal(OwnerKind.None, a.Broker.Journal.Current.Groups[group].OwnerKind);
        proxy.Heal();

        await ReplicaTests.WaitForGroupAsync(b.Broker, group, g => g.OwnerKind == OwnerKind.None);
        var heir = ReplicaTests.Claim(b.Broker, group, "heir");
        Assert.Equal(heir.Id, (await ReplicaTests.WaitForGroupAsync(a.Broker, group, g => g.OwnerKind == OwnerKind.User)).OwnerSession);
    }

    // Long enough that etcd answers (or a lease is kept) on a loaded machine, where it may lag by seconds.
    private static readonly TimeSpan LongTtl = TimeSpan.FromSeconds(60);
    private static readonly TimeSpan LongCall = TimeSpan.FromSeconds(10);

    // Awaits what the test's premise needs of etcd; its not coming is no failure of the store.
    internal static async Task<T> PremiseAsync<T>(Task<T> premise, string unmet)
    {
        try
        {
            return await premise;
        }
        catch (TimeoutException)
        {
            Assert.Fail($"premise not met: {unmet}");
            throw;
        }
    }

    [Fact]
    public async Task StoppedStore_ClaimFailsEagain_ReleaseStillReleases_NeitherIsABrokerFault()
    {
        await using var rig = await Rig.StartAsync();
        var (a, groups, session, container) = (rig.A, rig.Groups, rig.Session, rig.Container);

        // The replica is stopping: its etcd client is closed while calls still come in.
        await a.Store.DisposeAsync();

        var refused = Assert.Throws<ErrnoException>(() => a.Broker.Vfio.SetContainer(session, groups[1], container.Id));
        Assert.Equal(Errno.EAGAIN, refused.Errno);
        Assert.Equal(OwnerKind.None, a.Broker.Journal.Current.Groups[groups[1]].OwnerKind);
        a.Broker.Vfio.UnsetContainer(session, groups[0]);
        Assert.Equal(OwnerKind.None, a.Broker.Journal.Current.Groups[groups[0]].OwnerKind);
    }

    /// <summary>etcd, one replica, and a session of it that holds the first free group (so it has its etcd lease).</summary>
    private sealed record Rig(EtcdCluster Etcd, Replica A, uint[] Groups, Core.Sessions.Session Session, Container Container) : IAsyncDisposable
    {
        public static async Task<Rig> StartAsync()
        {
            var etcd = await EtcdCluster.StartAsync();
            try
            {
                var a = await Replica.StartAsync("a", etcd.Endpoints, ttl: TimeSpan.FromSeconds(30));
                var groups = ReplicaTests.FreeGroups(a.Broker);
                var session = a.Broker.Sessions.Open("retried");
                var container = a.Broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
                a.Broker.Vfio.SetContainer(session, groups[0], container.Id);
                return new Rig(etcd, a, groups, session, container);
            }
            catch
            {
                await etcd.DisposeAsync();
                throw;
            }
        }

        public async ValueTask DisposeAsync()
        {
            await A.DisposeAsync();
            await Etcd.DisposeAsync();
        }
    }
}
