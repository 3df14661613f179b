using System.Collections.Concurrent;
using DmaBroker.Core;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Etcdserverpb;
using Google.Protobuf;
using Grpc.Net.Client;
using Mvccpb;
using Xunit.Abstractions;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// Many claims of the same few groups from sessions on three replicas: never two owners at once
/// (SPEC §10.1 across replicas), checked three ways: by the claimers themselves, from etcd's
/// history of the groups' keys, and from every replica's watch.
/// </summary>
public sealed class ContentionTests(ITestOutputHelper output)
{
    private const int Replicas = 3;
    private const int SessionsPerReplica = 4;
    // SPEC §16's figure (issue 12): 10,000 claims in all, shared by every session as they go.
    private const int Claims = 10_000;
    private const int Groups = 2;
    private static readonly TimeSpan LeaseTtl = TimeSpan.FromSeconds(30);

    [Fact]
    public async Task ManyClaims_OfFewGroups_FromThreeReplicas_NeverHaveTwoOwners()
    {
        await using var etcd = await EtcdCluster.StartAsync();
        var replicas = new List<Replica>();
        try
        {
            // Fencing is not what this test is about: a lease long enough that a CI machine busy with
            // other test assemblies (etcd's fsync and keepalives delayed by seconds) fences nobody
            // mid-run, which would end a claimer's session ("session … has ended").
            for (var r = 0; r < Replicas; r++)
                replicas.Add(await Replica.StartAsync($"r{r}", etcd.Endpoints, ttl: LeaseTtl));
            var groups = ReplicaTests.FreeGroups(replicas[0].Broker)[..Groups];
            var watches = replicas.Select(r => Record(r.Broker, groups)).ToList();
            var holder = new ulong[groups.Length];
            long left = Claims;
            long granted = 0;
            long refused = 0;
            var doubleOwner = new ConcurrentBag<string>();

            var clock = System.Diagnostics.Stopwatch.StartNew();
            // Claims block on etcd under the group's lock: each worker gets a thread of its own, so
            // the pool stays free for the gRPC I/O they wait on.
            var workers = replicas.SelectMany(replica => Enumerable.Range(0, SessionsPerReplica).Select(i => Task.Factory.StartNew(() =>
            {
                var broker = replica.Broker;
                var session = broker.Sessions.Open($"{replica.Store.Replica}-{i}");
                var container = broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
                var random = new Random((int)session.Id);
                while (Interlocked.Decrement(ref left) >= 0)
                {
                    var g = random.Next(groups.Length);
                    try
                    {
                        broker.Vfio.SetContainer(session, groups[g], container.Id);
                    }
                    catch (ErrnoException e) when (e.Errno == Errno.EPERM || (e.Errno == Errno.EINVAL && e.Message.Contains("another session", StringComparison.Ordinal)))
                    {
                        // EPERM: another replica's session holds it; EINVAL: a session of this
                        // replica holds it through its container (VFIO's answer).
                        Interlocked.Increment(ref refused);
                        continue;
                    }
                    Interlocked.Increment(ref granted);
                    // Held from the claim's commit until before the release begins: another
                    // session's claim can commit only after the release, so it must find 0 here.
                    if (Interlocked.CompareExchange(ref holder[g], session.Id, 0) is var other and not 0)
                        doubleOwner.Add($"group {groups[g]}: session {session.Id} granted while {other} held it");
                    Interlocked.CompareExchange(ref holder[g], 0, session.Id);
                    broker.Vfio.UnsetContainer(session, groups[g]);
                }
                return session;
            }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default))).ToList();
            var sessions = await Task.WhenAll(workers).WaitAsync(TimeSpan.FromMinutes(3));
            var elapsed = clock.Elapsed;

            Assert.Empty(doubleOwner);
            Assert.Equal(Claims, granted + refused);
            Assert.True(granted > 0);

            // etcd's history: each key is created by one grant, changed only by its owner, deleted by its release.
            var grants = await CheckHistoryAsync(etcd.Endpoints[0], groups);
            Assert.Equal(granted, grants.Count);

            // Every replica's watch shows one owner at a time, each grant one etcd made, in etcd's
            // order: all of its own sessions' grants, and the other replicas' as its watch delivered
            // them (one that a later local grant overtook before delivery is not shown: the view
            // moves straight to the newer state, as a resync would).
            var history = grants.ToDictionary(x => (x.Group, x.Generation), x => x.Session);
            var shown = new List<int>();
            foreach (var (replica, watch) in replicas.Zip(watches))
            {
                foreach (var g in groups)
                    await ReplicaTests.WaitForGroupAsync(replica.Broker, g, x => x.OwnerKind == OwnerKind.None && x.Generation > 0);
                using (watch)
                {
                    var seen = await watch.ReadAsync(replica.Broker.Journal.Current.Revision);
                    foreach (var (group, generation, session) in seen)
                        Assert.Equal(history[(group, generation)], session);
                    var own = seen.Count(x => x.Session >> 32 == replica.Store.ReplicaNumber);
                    Assert.Equal(grants.Count(x => x.Session >> 32 == replica.Store.ReplicaNumber), own);
                    shown.Add(seen.Count);
                }
            }
            output.WriteLine($"{granted + refused} claims from {sessions.Length} sessions on {Replicas} replicas in {elapsed.TotalSeconds:F1} s ({(granted + refused) / elapsed.TotalSeconds:F0}/s): {granted} granted, {refused} refused (EPERM, or EINVAL from the replica's own VFIO), one owner at a time in etcd's history and in {Replicas} watches (grants shown: {string.Join(", ", shown)})");
        }
        finally
        {
            foreach (var r in replicas)
                await r.DisposeAsync();
        }
    }

    // Reads every change of the groups' keys since etcd began (its history is not compacted) and
    // checks that a key changes owner only through a delete. Returns the number of grants.
    private static async Task<List<(uint Group, ulong Generation, ulong Session)>> CheckHistoryAsync(Uri endpoint, uint[] groups)
    {
        using var channel = GrpcChannel.ForAddress(endpoint);
        var kv = new KV.KVClient(channel);
        var watch = new Watch.WatchClient(channel);
        var prefix = ByteString.CopyFromUtf8("/dmabroker/groups/");
        // A key under the prefix that names no group (replicas ignore it): once the watch reaches
        // it, it has replayed every change before it.
        var end = ByteString.CopyFromUtf8("/dmabroker/groups/~history-end");
        await kv.PutAsync(new PutRequest { Key = end, Value = ByteString.CopyFromUtf8("end") });
        using var call = watch.Watch();
        await call.RequestStream.WriteAsync(new WatchRequest
        {
            CreateRequest = new WatchCreateRequest { Key = prefix, RangeEnd = dotnet_etcd.EtcdClient.GetRangeEnd(prefix), StartRevision = 1, PrevKv = true },
        });
        var grants = new List<(uint Group, ulong Generation, ulong Session)>();
        var owner = new Dictionary<string, ulong>();
        using var cts = new CancellationTokenSource(ReplicaTests.Timeout);
        var done = false;
        while (!done && await call.ResponseStream.MoveNext(cts.Token))
        {
            foreach (var ev in call.ResponseStream.Current.Events)
            {
                if (ev.Kv.Key == end)
                {
                    done = true;
                    break;
                }
                // The first replica records the topology's kernel drivers' counts (the NVMe and NIC groups): not claims.
                if (ev.Type == Event.Types.EventType.Put && GroupRecord.Decode(ev.Kv.Value) is { IsKernel: true })
                    continue;
                var key = ev.Kv.Key.ToStringUtf8();
                Assert.Contains(groups, g => key.EndsWith("/" + g, StringComparison.Ordinal));
                if (ev.Type == Event.Types.EventType.Delete)
                {
                    Assert.True(owner.Remove(key), $"{key} deleted at {ev.Kv.ModRevision} while not owned");
                    continue;
                }
                var record = GroupRecord.Decode(ev.Kv.Value)!;
                if (ev.Kv.Version == 1)
                {
                    Assert.True(owner.TryAdd(key, record.Session), $"{key} granted at {ev.Kv.ModRevision} while owned");
                    grants.Add((GroupRecord.GroupOf(ev.Kv.Key)!.Value, (ulong)ev.Kv.CreateRevision, record.Session));
                }
                else
                {
                    Assert.Equal(owner[key], record.Session);
                }
            }
        }
        Assert.True(done, "the watch replayed etcd's history to its end");
        Assert.Empty(owner);
        return grants;
    }

    private static GroupLog Record(Broker broker, uint[] groups) => new(broker.Journal.Watch(), groups);

    /// <summary>
    /// One replica's watch of the groups, buffered (the replicas' watch buffers hold a whole run),
    /// read at the end: the grants it showed, each checked against the group's previous state.
    /// </summary>
    private sealed class GroupLog(TopologyWatcher watcher, uint[] groups) : IDisposable
    {
        /// <summary>Reads every change up to <paramref name="revision"/>; returns each grant shown: group, generation, owner.</summary>
        public async Task<List<(uint Group, ulong Generation, ulong Session)>> ReadAsync(ulong revision)
        {
            var grants = new List<(uint, ulong, ulong)>();
            var last = new Dictionary<uint, GroupInfo>();
            using var cts = new CancellationTokenSource(ReplicaTests.Timeout);
            await foreach (var ev in watcher.ReadAllAsync(cts.Token))
            {
                IEnumerable<GroupInfo> changed = ev.Snapshot is { } s ? groups.Select(g => s.Groups[g])
                    : ev.Change is GroupChanged { Group: var g } && groups.Contains(g.Id) ? [g] : [];
                foreach (var group in changed)
                {
                    if (last.TryGetValue(group.Id, out var before) && group.OwnerKind == OwnerKind.User)
                    {
                        if (before.OwnerKind == OwnerKind.User)
                        {
                            Assert.Equal(before.OwnerSession, group.OwnerSession);
                        }
                        else
                        {
                            Assert.True(group.Generation > before.Generation, $"group {group.Id}: grant generation {group.Generation} after {before.Generation}");
                            grants.Add((group.Id, group.Generation, group.OwnerSession));
                        }
                    }
                    last[group.Id] = group;
                }
                if (ev.Revision >= revision)
                    break;
            }
            Assert.Equal(0, watcher.Resyncs);
            return grants;
        }

        public void Dispose() => watcher.Dispose();
    }
}
