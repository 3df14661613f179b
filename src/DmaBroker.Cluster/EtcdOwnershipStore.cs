using System.Collections.Concurrent;
using System.Globalization;
using System.Threading.Channels;
using DmaBroker.Core;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using dotnet_etcd;
using Etcdserverpb;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client.Configuration;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Mvccpb;

namespace DmaBroker.Cluster;

/// <summary>etcd could not be reached to join the cluster.</summary>
public sealed class ClusterUnavailableException(string message, Exception inner) : Exception(message, inner);

/// <summary>
/// The cluster store on etcd (SPEC §16). A user claim or release is one etcd transaction that
/// compares the group's key with the owner and count this replica expects, so exactly one replica's
/// session can win a free group; a new grant's generation is the transaction's revision. Each
/// session that owns something has an etcd lease (the session's TTL), kept alive by this replica,
/// and its group keys are attached to it: a replica that dies loses its leases, and its sessions'
/// groups go free with them. Kernel DMA-API drivers own a group through the same key (a record of
/// their count, with no lease), so a driver bind and a user claim compare the same key and only one
/// of them can win; each device's driver and each hotplug have keys of their own
/// (<see cref="DriverRecord"/>, <see cref="HotplugRecord"/>). A watch on all of them brings the other
/// replicas' claims, releases, binds and hotplug into this replica's table, and so into its
/// <c>Topology.Watch</c>.
/// </summary>
/// <remarks>
/// Calls run under the group's lock (lock 2 of docs/locking.md), and hotplug under the hotplug
/// lock too, blocking on etcd: one group's changes are serialised as they are in one process;
/// different groups' run in parallel. A change this replica makes on a view of etcd that another
/// replica has changed since is refused (EAGAIN, or the errno the change it lost to calls for) and
/// changes nothing; the watch brings the newer view, and the call can be tried again.
/// </remarks>
public sealed partial class EtcdOwnershipStore : IOwnershipStore, IAsyncDisposable
{
    private const string SessionsPrefix = "/dmabroker/sessions/";
    private const string ReplicasPrefix = "/dmabroker/replicas/";
    private const string ReplicaSequenceKey = "/dmabroker/replica-seq";
    private const string TopologyKey = "/dmabroker/topology";
    private const string RootPrefix = "/dmabroker/";

    private readonly EtcdStoreOptions _options;
    private readonly EtcdClient _client;
    private readonly KV.KVClient _kv;
    private readonly Lease.LeaseClient _leaseClient;
    private readonly Watch.WatchClient _watchClient;
    private readonly TimeProvider _time;
    private readonly ILogger _log;
    private readonly LeaseKeeper _keeper;
    private readonly CancellationTokenSource _stop = new();
    // The etcd revision of the last change this replica wrote or applied, per group; read and
    // written only under that group's lock.
    private readonly ConcurrentDictionary<uint, long> _revisions = new();
    // The mod revision of each device's driver key as this replica last wrote or saw it (absent: the
    // topology's driver, 0); read and written only under the device's group's lock.
    private readonly ConcurrentDictionary<PciAddress, long> _drivers = new();
    // The revision of the last hotplug this replica wrote or applied; read and written only under the hotplug lock.
    private long _shape;
    private readonly ConcurrentDictionary<ulong, Lazy<SessionLease>> _leases = new();
    private readonly ApplyFailures _applyFailures = new();
    // The groups whose last claim or release by a session of this replica etcd did not answer, with
    // that session (see Unsettle); _settle wakes SettleAsync for them.
    private readonly ConcurrentDictionary<uint, ulong> _unsettled = new();
    private readonly Channel<bool> _settle = Channel.CreateBounded<bool>(
        new BoundedChannelOptions(1) { FullMode = BoundedChannelFullMode.DropWrite });
    // This replica's name in the cluster, on a lease of its own; replaced when it is renewed.
    private volatile SessionLease? _registration;
    // Another replica took this one's name while its registration had lapsed.
    private volatile bool _nameTaken;
    // This process's mark in the name's key: a key that holds it is this replica's registration,
    // whatever lease it is on (an attempt to renew it may have committed unanswered).
    private readonly string _process = Guid.NewGuid().ToString("N");
    // The registration lease being renewed now, if one is, and the renewal.
    private SessionLease? _renewing;
    private volatile Task _renewal = Task.CompletedTask;
    private Broker? _broker;
    private Task _watch = Task.CompletedTask;
    private Task _settling = Task.CompletedTask;
    private int _disposed;

    private EtcdOwnershipStore(EtcdStoreOptions options, TimeProvider time, ILogger log)
    {
        _options = options;
        _time = time;
        _log = log;
        _client = new EtcdClient(string.Join(",", options.Endpoints.Select(e => e.GetLeftPart(UriPartial.Authority))),
            configureChannelOptions: channel => channel.ServiceConfig = Failover);
        var connection = _client.GetConnection();
        _kv = connection.KVClient;
        _leaseClient = connection.LeaseClient;
        _watchClient = connection.WatchClient;
        _keeper = new LeaseKeeper(_leaseClient, time, TimeSpan.FromSeconds(options.TtlSeconds), log, Fence);
    }

    // Calls spread over every member; one refused by a member that is gone (UNAVAILABLE) is tried
    // again on another. A retried transaction that had in fact committed finds the key changed
    // and is refused: never a second owner, at worst a group held until its session's lease ends.
    private static readonly ServiceConfig Failover = new()
    {
        LoadBalancingConfigs = { new RoundRobinConfig() },
        MethodConfigs =
        {
            new MethodConfig
            {
                Names = { MethodName.Default },
                RetryPolicy = new RetryPolicy
                {
                    MaxAttempts = 5,
                    InitialBackoff = TimeSpan.FromMilliseconds(50),
                    MaxBackoff = TimeSpan.FromMilliseconds(500),
                    BackoffMultiplier = 2,
                    RetryableStatusCodes = { StatusCode.Unavailable },
                },
            },
        },
    };

    /// <inheritdoc/>
    public string Replica => _options.Replica;

    /// <inheritdoc/>
    public ulong FirstSessionId { get; private set; }

    /// <summary>This replica's number in the cluster, from etcd: its sessions' ids are <c>number &lt;&lt; 32</c> and up.</summary>
    public ulong ReplicaNumber { get; private set; }

    /// <summary>Session leases this replica keeps alive now (with its own registration).</summary>
    public int LeasesKept => _keeper.Count;

    /// <summary>The revision of etcd this replica's table has caught up with (its watch's progress).</summary>
    public long Revision => Interlocked.Read(ref _revision);

    private long _revision;

    /// <summary>
    /// Joins the cluster: registers <see cref="EtcdStoreOptions.Replica"/> under its own lease
    /// (EEXIST when a live replica has that name) and takes a replica number. Build the
    /// <see cref="Broker"/> with the store next, then <see cref="StartAsync"/> it.
    /// </summary>
    public static async Task<EtcdOwnershipStore> ConnectAsync(EtcdStoreOptions options, TimeProvider? time = null,
        ILogger? logger = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        // Claims block on etcd under their group's lock, a thread each, and the gRPC I/O they wait
        // on needs threads of the pool too: with the pool's default minimum (one a core), a few
        // blocked claims starve it until its slow thread injection, and etcd's answers miss their
        // deadline. Whoever embeds the store (the broker host, a test, a benchmark) gets this.
        ThreadPool.GetMinThreads(out var workers, out var io);
        ThreadPool.SetMinThreads(Math.Max(workers, 64), io);
        var store = new EtcdOwnershipStore(options, time ?? TimeProvider.System, logger ?? NullLogger.Instance);
        try
        {
            await store.RegisterAsync(cancellationToken).ConfigureAwait(false);
            return store;
        }
        catch (RpcException e)
        {
            await store.DisposeAsync().ConfigureAwait(false);
            throw new ClusterUnavailableException(
                $"cannot join the cluster: etcd at {string.Join(",", options.Endpoints)} did not answer ({e.StatusCode}: {e.Status.Detail})", e);
        }
        catch
        {
            await store.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    private async Task RegisterAsync(CancellationToken cancellationToken)
    {
        _registration = await ClaimNameAsync([], cancellationToken).ConfigureAwait(false)
            ?? throw ErrnoException.Exists($"a live replica named {ErrnoException.Quote(Replica)} is already in the cluster");
        // The replica's number: one compare-and-swap on a counter, retried while another replica races.
        var counter = ByteString.CopyFromUtf8(ReplicaSequenceKey);
        while (true)
        {
            var current = await _kv.RangeAsync(new RangeRequest { Key = counter }, deadline: Deadline(), cancellationToken: cancellationToken);
            var kv = current.Kvs.FirstOrDefault();
            var last = kv is null ? 0UL : ulong.Parse(kv.Value.ToStringUtf8(), CultureInfo.InvariantCulture);
            var next = last + 1;
            var bump = new TxnRequest();
            bump.Compare.Add(new Compare { Key = counter, Target = Compare.Types.CompareTarget.Mod, Result = Compare.Types.CompareResult.Equal, ModRevision = kv?.ModRevision ?? 0 });
            bump.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = counter, Value = ByteString.CopyFromUtf8(next.ToString(CultureInfo.InvariantCulture)) } });
            if ((await _kv.TxnAsync(bump, deadline: Deadline(), cancellationToken: cancellationToken)).Succeeded)
            {
                // 2^21 replica starts keep every id below 2^53, exact in JSON numbers.
                ReplicaNumber = ((next - 1) % (1UL << 21)) + 1;
                FirstSessionId = (ReplicaNumber << 32) + 1;
                return;
            }
        }
    }

    // Takes the replica's name under a new lease of its own and keeps the lease alive: the name's
    // key is free, or it holds this process's registration (its value carries _process) on any
    // lease: the one the replica gave up, which etcd may not have expired yet, or one of an earlier
    // attempt whose transaction committed unanswered. Such a key moves to the new lease. Null when
    // another process holds the name. `strays` are the leases of earlier attempts that failed: once
    // this one has the name on a lease of its own (or knows it taken) they hold nothing, and are revoked.
    private async Task<SessionLease?> ClaimNameAsync(List<long> strays, CancellationToken cancellationToken)
    {
        var sentAt = _time.GetTimestamp();
        var grant = await _leaseClient.LeaseGrantAsync(new LeaseGrantRequest { TTL = _options.TtlSeconds }, deadline: Deadline(), cancellationToken: cancellationToken);
        var lease = new SessionLease(grant.ID, null, TimeSpan.FromSeconds(grant.TTL));
        lease.Sent(sentAt);
        lease.Answered(lease.Ttl, _time);
        var key = ByteString.CopyFromUtf8(ReplicasPrefix + Replica);
        var value = ByteString.CopyFromUtf8(string.Create(CultureInfo.InvariantCulture, $"{{\"replica\":\"{Replica}\",\"process\":\"{_process}\"}}"));
        var put = new RequestOp { RequestPut = new PutRequest { Key = key, Value = value, Lease = grant.ID } };
        bool named;
        try
        {
            while (true)
            {
                var claim = new TxnRequest();
                claim.Compare.Add(new Compare { Key = key, Target = Compare.Types.CompareTarget.Version, Result = Compare.Types.CompareResult.Equal, Version = 0 });
                claim.Success.Add(put);
                claim.Failure.Add(new RequestOp { RequestRange = new RangeRequest { Key = key } });
                var answer = await _kv.TxnAsync(claim, deadline: Deadline(), cancellationToken: cancellationToken);
                if (answer.Succeeded || Found(answer, 0) is not { } held || held.Value != value)
                {
                    named = answer.Succeeded;
                    break;
                }
                // Ours, on another lease: move it, compared on its mod revision; if it changed since
                // (expired, or moved by an attempt still in flight), look again.
                var move = new TxnRequest();
                move.Compare.Add(new Compare { Key = key, Target = Compare.Types.CompareTarget.Mod, Result = Compare.Types.CompareResult.Equal, ModRevision = held.ModRevision });
                move.Success.Add(put);
                if ((await _kv.TxnAsync(move, deadline: Deadline(), cancellationToken: cancellationToken)).Succeeded)
                {
                    named = true;
                    if (held.Lease != 0 && held.Lease != grant.ID && !strays.Contains(held.Lease))
                        strays.Add(held.Lease);
                    break;
                }
            }
        }
        catch
        {
            // This attempt's transaction may have committed unanswered: its lease may hold the
            // name, which the next attempt moves; revoking it now would free the name for anyone.
            strays.Add(grant.ID);
            throw;
        }
        foreach (var stray in strays)
            await RevokeAsync(stray).ConfigureAwait(false);
        strays.Clear();
        if (!named)
        {
            await RevokeAsync(grant.ID).ConfigureAwait(false);
            return null;
        }
        _keeper.Track(lease);
        return lease;
    }

    // The registration's lease was given up (not renewed in time: etcd was out of reach) and etcd
    // expires it, and the name's key with it: another broker could then start with this replica's
    // name, and each would take the other's records for its own. So the replica takes its name
    // again under a new lease as soon as etcd answers, and refuses claims until it has (CommitClaim);
    // if another replica has taken the name meanwhile, it says so and refuses them for good.
    private async Task RenewRegistrationAsync(SessionLease lost)
    {
        await Task.Yield(); // off the keeper's timer
        _keeper.Forget(lost);
        Log.RegistrationLost(_log, Replica, lost.Id);
        try
        {
            await ClaimNameAgainAsync(lost).ConfigureAwait(false);
        }
        finally
        {
            Interlocked.Exchange(ref _renewing, null);
        }
    }

    private async Task ClaimNameAgainAsync(SessionLease lost)
    {
        // The lost lease is revoked once the name is on a new one (it holds nothing else).
        var strays = new List<long> { lost.Id };
        while (!_stop.IsCancellationRequested)
        {
            try
            {
                if (await ClaimNameAsync(strays, _stop.Token).ConfigureAwait(false) is not { } renewed)
                {
                    _nameTaken = true;
                    Log.NameTaken(_log, Replica);
                    return;
                }
                _registration = renewed;
                Log.RegistrationRenewed(_log, Replica, renewed.Id);
                return;
            }
            catch (RpcException e)
            {
                Log.RegistrationNotRenewed(_log, Replica, e.StatusCode, e.Status.Detail);
            }
            catch (Exception e) when (_stop.IsCancellationRequested && e is OperationCanceledException or ObjectDisposedException)
            {
                return;
            }
            catch (Exception e)
            {
                Log.RegistrationNotRenewed(_log, Replica, e.Message);
            }
            try
            {
                await Task.Delay(_keeper.Interval, _time, _stop.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }
        }
    }

    /// <summary>
    /// Serves <paramref name="broker"/>, built with this store: loads the cluster's group table into
    /// it, then follows etcd's watch from that revision on.
    /// </summary>
    public async Task StartAsync(Broker broker, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(broker);
        if (broker.Table.Store != this)
            throw new ArgumentException("the broker was not built with this store", nameof(broker));
        _broker = broker;
        await SeedAsync(broker.Journal.Current, cancellationToken).ConfigureAwait(false);
        var revision = await ResyncAsync(cancellationToken).ConfigureAwait(false);
        _watch = WatchAsync(revision + 1);
        _settling = SettleAsync();
    }

    // --- IOwnershipStore ---

    /// <inheritdoc/>
    public ulong CommitClaim(uint groupId, Session session, int countBefore, ulong generation)
    {
        ArgumentNullException.ThrowIfNull(session);
        CheckRegistered();
        var lease = LeaseOf(session);
        if (lease.Lost)
            throw ErrnoException.Conflict(Errno.EAGAIN, $"session {session.Id}'s etcd lease could not be renewed; it is ending");
        // The table before this claim: the session's countBefore claims, or a free group.
        Call(() => Settle(groupId, countBefore == 0 ? 0 : session.Id, countBefore), $"claim of group {groupId}");
        var key = GroupRecord.Key(groupId);
        var claimed = Record(session.Id, countBefore + 1).Encode();
        for (var attempt = 1; ; attempt++)
        {
            var fence = lease.Fence;
            var txn = new TxnRequest();
            txn.Compare.Add(countBefore == 0
                ? new Compare { Key = key, Target = Compare.Types.CompareTarget.Version, Result = Compare.Types.CompareResult.Equal, Version = 0 }
                : new Compare { Key = key, Target = Compare.Types.CompareTarget.Value, Result = Compare.Types.CompareResult.Equal, Value = Record(session.Id, countBefore).Encode() });
            txn.Compare.Add(FenceIs(session.Id, fence));
            txn.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = key, Value = claimed, Lease = lease.Id } });
            txn.Failure.Add(new RequestOp { RequestRange = new RangeRequest { Key = key } });
            txn.Failure.Add(new RequestOp { RequestRange = new RangeRequest { Key = SessionKey(session.Id) } });
            var answer = Call(() => _kv.Txn(txn, deadline: Deadline()), $"claim of group {groupId}", () => Unsettle(groupId, session));
            if (answer.Succeeded)
            {
                var revision = answer.Header.Revision;
                _revisions[groupId] = revision;
                // A new grant created the key: its create_revision, this transaction's revision, is the generation.
                return countBefore == 0 ? (ulong)revision : generation;
            }
            var current = Found(answer, 0);
            // The key holds exactly what this claim writes, on this session's lease: an attempt of
            // this very claim committed and its answer was lost (the client retries a call etcd did
            // not answer in time). Refusing now would leave etcd owning the group for the session
            // while the table says free, until the session ended.
            if (current is not null && current.Lease == lease.Id && current.Value == claimed)
            {
                Log.ClaimFoundCommitted(_log, groupId, session.Id, current.ModRevision);
                _revisions[groupId] = current.ModRevision;
                return countBefore == 0 ? (ulong)current.CreateRevision : generation;
            }
            if (Found(answer, 1) is not { } record)
                throw ErrnoException.Conflict(Errno.EAGAIN, $"session {session.Id}'s etcd lease has ended; it is ending");
            // Another change of the session settled a transaction of it and moved its fence: this
            // one was refused for that alone if the group's compare held.
            if (record.ModRevision != fence)
            {
                lease.MoveFence(record.ModRevision);
                if (attempt < 3)
                    continue;
                // Settles kept moving it while the group was as the claim expects: transient,
                // unlike a group another owner holds (refused below).
                var groupHeld = countBefore == 0 ? current is null : current?.Value == Record(session.Id, countBefore).Encode();
                if (groupHeld)
                    throw Changed($"session {session.Id}'s transactions in the cluster were fenced off by its settling while the claim of group {groupId} was tried");
            }
            var holder = current is not null ? GroupRecord.Decode(current.Value) : null;
            throw ErrnoException.NotPermitted($"group {groupId} is {holder?.Describe() ?? "changed by another replica"} in the cluster");
        }
    }

    /// <inheritdoc/>
    public void CommitRelease(uint groupId, Session session, int countBefore, int countAfter, ulong generation)
    {
        ArgumentNullException.ThrowIfNull(session);
        if (!_leases.TryGetValue(session.Id, out var lazy) || !lazy.IsValueCreated || lazy.Value.Lost)
            return; // never recorded, or its lease is gone or going: etcd frees the group with it
        var lease = lazy.Value;
        var key = GroupRecord.Key(groupId);
        try
        {
            Settle(groupId, session.Id, countBefore);
            for (var attempt = 1; ; attempt++)
            {
                var fence = lease.Fence;
                var txn = new TxnRequest();
                txn.Compare.Add(new Compare { Key = key, Target = Compare.Types.CompareTarget.Value, Result = Compare.Types.CompareResult.Equal, Value = Record(session.Id, countBefore).Encode() });
                txn.Compare.Add(FenceIs(session.Id, fence));
                txn.Success.Add(countAfter == 0
                    ? new RequestOp { RequestDeleteRange = new DeleteRangeRequest { Key = key } }
                    : new RequestOp { RequestPut = new PutRequest { Key = key, Value = Record(session.Id, countAfter).Encode(), Lease = lease.Id } });
                txn.Failure.Add(new RequestOp { RequestRange = new RangeRequest { Key = SessionKey(session.Id) } });
                var answer = _kv.Txn(txn, deadline: Deadline());
                if (answer.Succeeded)
                {
                    _revisions[groupId] = answer.Header.Revision;
                    return;
                }
                if (Found(answer, 0) is { } record && record.ModRevision != fence && attempt < 3)
                {
                    lease.MoveFence(record.ModRevision);
                    continue;
                }
                Log.ReleaseNotRecorded(_log, groupId, session.Id, "the key holds another owner or count");
                Unsettle(groupId, session);
                return;
            }
        }
        catch (RpcException e)
        {
            // The table releases anyway; the release may or may not have committed, so the group is
            // settled once etcd answers again (or freed when the session's lease ends).
            Log.ReleaseNotRecorded(_log, groupId, session.Id, e.StatusCode, e.Status.Detail);
            Unsettle(groupId, session);
        }
        catch (ObjectDisposedException)
        {
            // The replica is stopping: its leases end with it, and the group with them.
            Log.ReleaseNotRecorded(_log, groupId, session.Id, "the replica is stopping");
        }
    }

    // A claim needs the replica's name held in the cluster, so that no other broker takes this one's records for its own.
    private void CheckRegistered()
    {
        if (_registration is { Lost: true })
        {
            // The renewal may be a moment from done: wait for it as long as for any etcd call.
            try
            {
                _renewal.Wait(_options.CallTimeout);
            }
            catch (AggregateException)
            {
                // it logged why
            }
        }
        if (_nameTaken)
            throw ErrnoException.Conflict(Errno.EEXIST, $"another broker took replica name {ErrnoException.Quote(Replica)} while this one was cut off from etcd; this replica makes no claims: restart it (with another --replica)");
        if (_registration is { Lost: true })
            throw new ErrnoException(Errno.EAGAIN, ErrorKind.FailedPrecondition, $"replica {Replica}'s registration in the cluster lapsed while etcd was out of reach; it is being renewed, try again")
            {
                RetryAfter = TimeSpan.FromSeconds(1),
            };
    }

    // --- changes of unknown outcome ---

    // A claim or release whose transaction etcd did not answer (the deadline passed, the connection
    // broke) may have committed, or may still commit: the client was told EAGAIN, or the table
    // released, and the table has the group as it was before the change (a claim) or after it (a
    // release), while etcd may hold the session's record with the change the table does not know.
    // Left so, a claim nobody retries keeps the group the session's in etcd, unclaimable by anyone,
    // until the session ends; and a release that commits late could delete the record of a claim the
    // session made since, leaving a group its owner holds free in etcd (two owners, SPEC §10.1).
    //
    // So the group is unsettled until etcd is brought in line with the table, deterministically, in
    // the table's favour (never adopted: the client was told the claim failed, and no container is
    // set on it). Settle runs under the group's lock, as the group's commits do: first it moves the
    // session's fence (puts its record key again), which every claim and release of the session
    // compares, so no transaction of the session still in flight can commit after that point; then
    // it reads the group's key and, if it holds a record of that session that the table does not,
    // puts back the table's count or deletes it, compared on that key's mod revision. Settle runs
    // before the next change of the group on this replica (a change refused EAGAIN if etcd still does
    // not answer), and from SettleAsync as soon as etcd answers again, so a group nobody touches
    // goes free too. A session whose lease has ended or is given up needs none: its keys go with it.
    private void Unsettle(uint groupId, Session session)
    {
        _unsettled[groupId] = session.Id;
        _settle.Writer.TryWrite(true);
    }

    // Under the group's lock: brings the group's key in line with the table, which holds
    // `ownerSession`'s `count` claims on it (0, 0: not owned by a session of this replica), if a
    // change of the group's outcome is unknown. Throws RpcException while etcd does not answer.
    private void Settle(uint groupId, ulong ownerSession, int count)
    {
        if (!_unsettled.TryGetValue(groupId, out var sessionId))
            return;
        if (_leases.TryGetValue(sessionId, out var lazy) && lazy.IsValueCreated && !lazy.Value.Lost)
            SettleOn(groupId, lazy.Value, sessionId, ownerSession == sessionId ? count : 0);
        _unsettled.TryRemove(KeyValuePair.Create(groupId, sessionId));
    }

    private void SettleOn(uint groupId, SessionLease lease, ulong sessionId, int count)
    {
        try
        {
            var moved = _kv.Put(new PutRequest { Key = SessionKey(sessionId), Value = SessionRecord(lease.Id), Lease = lease.Id }, deadline: Deadline());
            lease.MoveFence(moved.Header.Revision);
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.NotFound)
        {
            return; // etcd: the lease is not found; it has ended, and the session's keys with it
        }
        var key = GroupRecord.Key(groupId);
        var wanted = count > 0 ? Record(sessionId, count).Encode() : null;
        while (true)
        {
            var kv = _kv.Range(new RangeRequest { Key = key }, deadline: Deadline()).Kvs.FirstOrDefault();
            if (kv is null || GroupRecord.Decode(kv.Value) is not { } held || held.Replica != Replica || held.Session != sessionId
                || (kv.Value == wanted && kv.Lease == lease.Id))
            {
                return;
            }
            var txn = new TxnRequest();
            txn.Compare.Add(new Compare { Key = key, Target = Compare.Types.CompareTarget.Mod, Result = Compare.Types.CompareResult.Equal, ModRevision = kv.ModRevision });
            txn.Success.Add(wanted is null
                ? new RequestOp { RequestDeleteRange = new DeleteRangeRequest { Key = key } }
                : new RequestOp { RequestPut = new PutRequest { Key = key, Value = wanted, Lease = lease.Id } });
            var answer = _kv.Txn(txn, deadline: Deadline());
            if (answer.Succeeded)
            {
                _revisions[groupId] = answer.Header.Revision;
                Log.Settled(_log, groupId, sessionId, held.Count, count);
                return;
            }
        }
    }

    // Settles every unsettled group as soon as etcd answers, each under its group's lock.
    private async Task SettleAsync()
    {
        try
        {
            while (await _settle.Reader.WaitToReadAsync(_stop.Token).ConfigureAwait(false))
            {
                _settle.Reader.TryRead(out _);
                while (!_unsettled.IsEmpty)
                {
                    foreach (var groupId in _unsettled.Keys)
                    {
                        if (!_unsettled.TryGetValue(groupId, out var sessionId))
                            continue;
                        try
                        {
                            if (!_broker!.Table.WithOwner(groupId, owner =>
                                Settle(groupId, owner.Kind == OwnerKind.User && owner.Replica is null ? owner.Session : 0, owner.Count)))
                            {
                                // No such group (removed): nothing to settle. Only the session read
                                // here is dropped, never one a later change put in its place.
                                _unsettled.TryRemove(KeyValuePair.Create(groupId, sessionId));
                            }
                        }
                        catch (RpcException e)
                        {
                            Log.SettleFailed(_log, groupId, e.StatusCode, e.Status.Detail);
                        }
                        catch (Exception e) when (!_stop.IsCancellationRequested)
                        {
                            Log.SettleFailed(_log, groupId, e.Message);
                        }
                    }
                    if (!_unsettled.IsEmpty)
                        await Task.Delay(TimeSpan.FromMilliseconds(200), _time, _stop.Token).ConfigureAwait(false);
                }
            }
        }
        catch (Exception e) when (_stop.IsCancellationRequested && e is OperationCanceledException or ObjectDisposedException)
        {
            // stopping: the session leases end with the replica, and their keys with them
        }
    }

    private static ByteString SessionKey(ulong sessionId) =>
        ByteString.CopyFromUtf8(SessionsPrefix + sessionId.ToString(CultureInfo.InvariantCulture));

    private ByteString SessionRecord(long leaseId) => ByteString.CopyFromUtf8(string.Create(CultureInfo.InvariantCulture,
        $"{{\"replica\":\"{Replica}\",\"lease\":{leaseId}}}"));

    // The compare that the session's record key is still at `fence`: no settle has fenced the session's transactions off since.
    private static Compare FenceIs(ulong sessionId, long fence) =>
        new() { Key = SessionKey(sessionId), Target = Compare.Types.CompareTarget.Mod, Result = Compare.Types.CompareResult.Equal, ModRevision = fence };

    /// <inheritdoc/>
    public void CommitDriver(uint groupId, GroupOwner owner, PciAddress device, string? driverBefore, string? driverAfter, int kernelCountAfter)
    {
        var key = GroupRecord.Key(groupId);
        var driverKey = DriverRecord.Key(device);
        var txn = new TxnRequest();
        txn.Compare.Add(OwnerIs(key, owner));
        txn.Compare.Add(new Compare { Key = driverKey, Target = Compare.Types.CompareTarget.Mod, Result = Compare.Types.CompareResult.Equal, ModRevision = _drivers.GetValueOrDefault(device) });
        if (OwnerBecomes(key, owner, kernelCountAfter) is { } ownerOp)
            txn.Success.Add(ownerOp);
        txn.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = driverKey, Value = DriverRecord.Encode(driverAfter) } });
        txn.Failure.Add(new RequestOp { RequestRange = new RangeRequest { Key = key } });
        txn.Failure.Add(new RequestOp { RequestRange = new RangeRequest { Key = driverKey } });
        var answer = Call(() => _kv.Txn(txn, deadline: Deadline()), $"driver change of {device}");
        if (answer.Succeeded)
        {
            _revisions[groupId] = answer.Header.Revision;
            _drivers[device] = answer.Header.Revision;
            return;
        }
        var holder = Found(answer, 0) is { } o ? GroupRecord.Decode(o.Value) : null;
        var driver = Found(answer, 1) is { } d ? DriverRecord.Decode(d.Value) : driverBefore;
        if (driverAfter is not null && kernelCountAfter > owner.Count && holder is { IsKernel: false })
            throw ErrnoException.Busy($"cannot bind DMA-API driver {driverAfter} to {device}: group {groupId} is {holder.Describe()} in the cluster");
        if (driver != driverBefore)
        {
            throw driverAfter is not null
                ? ErrnoException.Busy($"{device} was bound to {driver} on another replica; unbind it first")
                : driver is null
                    ? ErrnoException.Conflict(Errno.EINVAL, $"{device} has no driver bound: it was unbound on another replica")
                    : Changed($"{device}'s driver was changed to {driver} on another replica");
        }
        throw Changed($"group {groupId} was changed on another replica ({holder?.Describe() ?? "owned by nobody"})");
    }

    /// <inheritdoc/>
    public void CommitHotplug(PciFunctionSpec device, uint groupId, GroupOwner owner, bool added, string? driver, int kernelCountAfter)
    {
        ArgumentNullException.ThrowIfNull(device);
        var key = GroupRecord.Key(groupId);
        var hotplugKey = HotplugRecord.Key(device.Address);
        var txn = new TxnRequest();
        var shape = Interlocked.Read(ref _shape);
        txn.Compare.Add(new Compare { Key = HotplugRecord.ShapeKey, Target = Compare.Types.CompareTarget.Mod, Result = Compare.Types.CompareResult.Equal, ModRevision = shape });
        txn.Compare.Add(OwnerIs(key, owner));
        // In watch order: the device appears or goes, then its driver, then its group's count.
        txn.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = hotplugKey, Value = new HotplugRecord(added, groupId, added ? device : null).Encode() } });
        txn.Success.Add(added
            ? new RequestOp { RequestPut = new PutRequest { Key = DriverRecord.Key(device.Address), Value = DriverRecord.Encode(driver) } }
            : new RequestOp { RequestDeleteRange = new DeleteRangeRequest { Key = DriverRecord.Key(device.Address) } });
        if (OwnerBecomes(key, owner, kernelCountAfter) is { } ownerOp)
            txn.Success.Add(ownerOp);
        txn.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = HotplugRecord.ShapeKey, Value = ByteString.CopyFromUtf8(Replica) } });
        txn.Failure.Add(new RequestOp { RequestRange = new RangeRequest { Key = key } });
        txn.Failure.Add(new RequestOp { RequestRange = new RangeRequest { Key = hotplugKey } });
        var answer = Call(() => _kv.Txn(txn, deadline: Deadline()), $"hotplug of {device.Address}");
        if (answer.Succeeded)
        {
            var revision = answer.Header.Revision;
            _revisions[groupId] = revision;
            _drivers[device.Address] = added ? revision : 0;
            Interlocked.Exchange(ref _shape, revision);
            return;
        }
        var holder = Found(answer, 0) is { } o ? GroupRecord.Decode(o.Value) : null;
        var record = Found(answer, 1) is { } h && h.ModRevision > shape ? HotplugRecord.Decode(device.Address, h.Value) : null;
        if (record is { Added: true } && added)
            throw ErrnoException.Exists(record.Describe(device.Address));
        if (record is { Added: false } && !added)
            throw ErrnoException.NoDevice(device.Address);
        if (!added && holder is { IsKernel: false })
            throw ErrnoException.Busy($"{device.Address}: group {groupId} is {holder.Describe()} in the cluster");
        throw Changed($"the cluster's devices were changed on another replica; {device.Address} was not {(added ? "added" : "removed")}");
    }

    // The compare that the group's key holds `owner`, as this replica's table has it.
    private Compare OwnerIs(ByteString key, GroupOwner owner) => owner.Kind switch
    {
        OwnerKind.None => new Compare { Key = key, Target = Compare.Types.CompareTarget.Version, Result = Compare.Types.CompareResult.Equal, Version = 0 },
        OwnerKind.Kernel => new Compare { Key = key, Target = Compare.Types.CompareTarget.Value, Result = Compare.Types.CompareResult.Equal, Value = GroupRecord.Kernel(owner.Count).Encode() },
        _ => new Compare { Key = key, Target = Compare.Types.CompareTarget.Value, Result = Compare.Types.CompareResult.Equal, Value = new GroupRecord(owner.Session, owner.Replica ?? Replica, owner.Count).Encode() },
    };

    // The write that gives a group owned by nobody or by kernel drivers `kernelCount` kernel
    // drivers; null when that count does not change (a driver_managed_dma driver, a user's group).
    private static RequestOp? OwnerBecomes(ByteString key, GroupOwner owner, int kernelCount)
    {
        if (owner.Kind == OwnerKind.User || kernelCount == owner.Count)
            return null;
        return kernelCount == 0
            ? new RequestOp { RequestDeleteRange = new DeleteRangeRequest { Key = key } }
            : new RequestOp { RequestPut = new PutRequest { Key = key, Value = GroupRecord.Kernel(kernelCount).Encode() } };
    }

    private static KeyValue? Found(TxnResponse answer, int op) => answer.Responses.ElementAtOrDefault(op)?.ResponseRange?.Kvs.FirstOrDefault();

    private static ErrnoException Changed(string message) =>
        new(Errno.EAGAIN, ErrorKind.FailedPrecondition, $"{message}; try again once this replica has caught up")
        {
            RetryAfter = TimeSpan.FromMilliseconds(100),
        };

    /// <inheritdoc/>
    public void SessionEnded(Session session)
    {
        ArgumentNullException.ThrowIfNull(session);
        if (!_leases.TryRemove(session.Id, out var lazy) || !lazy.IsValueCreated)
            return;
        var lease = lazy.Value;
        lease.MarkLost();
        _keeper.Forget(lease);
        _ = RevokeAsync(lease);
    }

    // --- leases ---

    // The session's lease, granted at its first claim: a session that owns nothing needs none.
    private SessionLease LeaseOf(Session session)
    {
        var lazy = _leases.GetOrAdd(session.Id, _ => new Lazy<SessionLease>(() => GrantLease(session)));
        try
        {
            return lazy.Value;
        }
        catch
        {
            // A failed grant is not cached: the next claim tries again.
            _leases.TryRemove(KeyValuePair.Create(session.Id, lazy));
            throw;
        }
    }

    private SessionLease GrantLease(Session session)
    {
        var sentAt = _time.GetTimestamp();
        var grant = Call(() => _leaseClient.LeaseGrant(new LeaseGrantRequest { TTL = _options.TtlSeconds }, deadline: Deadline()), "lease grant");
        var lease = new SessionLease(grant.ID, session, TimeSpan.FromSeconds(grant.TTL));
        lease.Sent(sentAt);
        lease.Answered(lease.Ttl, _time);
        var put = Call(() => _kv.Put(new PutRequest { Key = SessionKey(session.Id), Value = SessionRecord(grant.ID), Lease = grant.ID }, deadline: Deadline()), "session record");
        lease.MoveFence(put.Header.Revision);
        _keeper.Track(lease);
        return lease;
    }

    // The keeper gave the lease up: stop the session's DMA and end it (SPEC §16's fencing). Ending
    // a session admits no new operation or DMA, waits out the ones in flight, then resets its
    // devices and detaches its domains before it releases anything.
    private void Fence(SessionLease lease)
    {
        if (lease.Session is null)
        {
            // The keeper may say so twice (the deadline, then etcd's answer): renew once.
            if (lease == _registration && Interlocked.CompareExchange(ref _renewing, lease, null) is null)
                _renewal = RenewRegistrationAsync(lease);
            return;
        }
        if (lease.Session is not { } session || _broker is null)
            return;
        _ = EndFencedAsync(session, "the broker could not renew the session's cluster lease (etcd) in time");
    }

    private Task RevokeAsync(SessionLease lease) => RevokeAsync(lease.Id);

    private async Task RevokeAsync(long leaseId)
    {
        try
        {
            await _leaseClient.LeaseRevokeAsync(new LeaseRevokeRequest { ID = leaseId }, deadline: Deadline());
        }
        catch (RpcException e)
        {
            Log.RevokeFailed(_log, leaseId, e.StatusCode, e.Status.Detail);
        }
    }

    // --- the watch ---

    // The first replica of a cluster records its topology and the kernel drivers it boots with
    // (their groups' counts); every later one checks that it starts from the same topology, since a
    // device without a driver key has the driver the topology gives it.
    private async Task SeedAsync(TopologySnapshot boot, CancellationToken cancellationToken)
    {
        var fingerprint = ByteString.CopyFromUtf8(Fingerprint(boot));
        var key = ByteString.CopyFromUtf8(TopologyKey);
        var seed = new TxnRequest();
        seed.Compare.Add(new Compare { Key = key, Target = Compare.Types.CompareTarget.Version, Result = Compare.Types.CompareResult.Equal, Version = 0 });
        seed.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = key, Value = fingerprint } });
        foreach (var group in boot.Groups.Values.Where(g => g.OwnerKind == OwnerKind.Kernel))
            seed.Success.Add(new RequestOp { RequestPut = new PutRequest { Key = GroupRecord.Key(group.Id), Value = GroupRecord.Kernel(group.OwnerCount).Encode() } });
        seed.Failure.Add(new RequestOp { RequestRange = new RangeRequest { Key = key } });
        var answer = await _kv.TxnAsync(seed, deadline: Deadline(), cancellationToken: cancellationToken);
        if (!answer.Succeeded && Found(answer, 0)?.Value is { } recorded && recorded != fingerprint)
            throw ErrnoException.Invalid($"replica {Replica} starts from another topology than the cluster's (fingerprint {Short(recorded)}…, this one's {Short(fingerprint)}…): every replica must use the same --topology");

        static string Short(ByteString value) => value.ToStringUtf8() is var text && text.Length > 12 ? text[..12] : text;
    }

    private static string Fingerprint(TopologySnapshot boot)
    {
        var text = new System.Text.StringBuilder();
        foreach (var d in boot.Devices.Values)
            text.Append(CultureInfo.InvariantCulture, $"{d.Address} {d.VendorId:x4}:{d.DeviceId:x4} {d.ClassCode:x6} {d.Model} {d.GroupId} {d.Driver}\n");
        return Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(text.ToString())));
    }

    // Loads the cluster's whole table from etcd into the broker's: the hotplug not yet applied, in
    // the order it happened; every group's owner, which either has a record (owned) or not (free);
    // and every device's driver that differs from the topology's. Returns the revision it read at.
    private async Task<long> ResyncAsync(CancellationToken cancellationToken)
    {
        var all = await _kv.RangeAsync(new RangeRequest
        {
            Key = ByteString.CopyFromUtf8(RootPrefix),
            RangeEnd = EtcdClient.GetRangeEnd(ByteString.CopyFromUtf8(RootPrefix)),
        }, deadline: Deadline(), cancellationToken: cancellationToken);
        var revision = all.Header.Revision;
        foreach (var kv in all.Kvs.Where(kv => HotplugRecord.DeviceOf(kv.Key).HasValue).OrderBy(kv => kv.ModRevision))
            ApplyChange(kv.Key, kv.ModRevision, () => ApplyHotplug(HotplugRecord.DeviceOf(kv.Key)!.Value, kv.ModRevision, kv.Value));
        var records = all.Kvs.Where(kv => GroupRecord.GroupOf(kv.Key).HasValue).ToDictionary(kv => GroupRecord.GroupOf(kv.Key)!.Value);
        foreach (var id in _broker!.Journal.Current.Groups.Keys)
        {
            // A key etcd does not hold is the same change (revision 0) on every reload.
            if (records.TryGetValue(id, out var kv))
                ApplyChange(kv.Key, kv.ModRevision, () => Apply(id, kv.ModRevision, kv.CreateRevision, GroupRecord.Decode(kv.Value), deleted: false));
            else
                ApplyChange(GroupRecord.Key(id), 0, () => Apply(id, revision, 0, null, deleted: true));
        }
        // After the owners: a DMA-API driver is taken only into a group no user owns (ApplyRemoteDriver).
        foreach (var kv in all.Kvs.Where(kv => DriverRecord.DeviceOf(kv.Key).HasValue))
            ApplyChange(kv.Key, kv.ModRevision, () => ApplyDriver(DriverRecord.DeviceOf(kv.Key)!.Value, kv.ModRevision, kv.Value));
        Interlocked.Exchange(ref _revision, Math.Max(Interlocked.Read(ref _revision), revision));
        return revision;
    }

    // etcd clientv3's WithRequireLeader: a member that has lost its leader (cut off from the others'
    // majority) ends the watch with "no leader" (UNAVAILABLE) a few election timeouts later, and
    // refuses a new one at once, instead of delivering nothing, silently, while the others go on. The
    // watch then starts again on another member, from a reload of the whole table (below).
    private static readonly Metadata RequireLeader = new() { { "hasleader", "true" } };

    private async Task WatchAsync(long from)
    {
        var request = new WatchRequest
        {
            CreateRequest = new WatchCreateRequest
            {
                Key = ByteString.CopyFromUtf8(RootPrefix),
                RangeEnd = EtcdClient.GetRangeEnd(ByteString.CopyFromUtf8(RootPrefix)),
                PrevKv = true,
            },
        };
        var resync = false;
        while (!_stop.IsCancellationRequested)
        {
            try
            {
                // After a break, reload the whole table rather than resume: changes refused while a
                // fenced session still held its groups here are taken from the reload.
                if (resync)
                {
                    from = await ResyncAsync(_stop.Token).ConfigureAwait(false) + 1;
                    resync = false;
                }
                request.CreateRequest.StartRevision = from;
                using var call = _watchClient.Watch(RequireLeader, cancellationToken: _stop.Token);
                await call.RequestStream.WriteAsync(request, _stop.Token).ConfigureAwait(false);
                while (await call.ResponseStream.MoveNext(_stop.Token).ConfigureAwait(false))
                {
                    var answer = call.ResponseStream.Current;
                    if (answer.CompactRevision > 0)
                    {
                        // The history we need is compacted away: start over from a fresh table.
                        from = await ResyncAsync(_stop.Token).ConfigureAwait(false) + 1;
                        break;
                    }
                    foreach (var ev in answer.Events)
                    {
                        // One that fails is not marked applied: the reload after the break brings it again.
                        ApplyChange(ev.Kv.Key, ev.Kv.ModRevision, () => ApplyEvent(ev));
                        from = ev.Kv.ModRevision + 1;
                    }
                    if (answer.Header is { } header && answer.Events.Count > 0)
                        Interlocked.Exchange(ref _revision, Math.Max(Interlocked.Read(ref _revision), header.Revision));
                }
            }
            catch (Exception e) when (!_stop.IsCancellationRequested)
            {
                // Whatever broke the stream (a member gone, a reset connection, a change that failed
                // to apply), start again on any member.
                Log.WatchFailed(_log, e.Message);
                resync = true;
                try
                {
                    await Task.Delay(TimeSpan.FromMilliseconds(200), _time, _stop.Token).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    return;
                }
            }
            catch (Exception)
            {
                return; // stopping: the stream was cancelled with the store
            }
        }
    }

    // Applies one change from etcd (the watch's, or a reload's) to the table. One that fails is
    // logged as an error and thrown, so the watch reloads the table to try it again; one that has
    // failed ApplyFailures.Limit times in a row is given up (logged critical) rather than stall
    // the watch for good: the table misses it until the key's next change.
    private void ApplyChange(ByteString key, long revision, Action apply)
    {
        var name = key.ToStringUtf8();
        if (_applyFailures.GivenUp(name, revision))
            return;
        try
        {
            apply();
            _applyFailures.Applied(name);
        }
        catch (Exception e) when (!_stop.IsCancellationRequested)
        {
            var failures = _applyFailures.Failed(name, revision);
            if (failures >= ApplyFailures.Limit)
            {
                Log.ChangeGivenUp(_log, name, revision, failures, e);
                return;
            }
            Log.ApplyFailed(_log, name, revision, failures, e);
            throw;
        }
    }

    // One event of the watch: a group's owner, a hotplug, or a device's driver.
    private void ApplyEvent(Event ev)
    {
        if (GroupRecord.GroupOf(ev.Kv.Key) is { } id)
        {
            var deleted = ev.Type == Event.Types.EventType.Delete;
            Apply(id, ev.Kv.ModRevision, ev.Kv.CreateRevision, GroupRecord.Decode(deleted ? ev.PrevKv?.Value ?? ByteString.Empty : ev.Kv.Value), deleted);
        }
        else if (ev.Type == Event.Types.EventType.Put && HotplugRecord.DeviceOf(ev.Kv.Key) is { } plugged)
        {
            ApplyHotplug(plugged, ev.Kv.ModRevision, ev.Kv.Value);
        }
        else if (ev.Type == Event.Types.EventType.Put && DriverRecord.DeviceOf(ev.Kv.Key) is { } device)
        {
            // A deleted driver key goes with its device's removal, which the hotplug key brings.
            ApplyDriver(device, ev.Kv.ModRevision, ev.Kv.Value);
        }
    }

    // Another replica's hotplug, at etcd revision `revision`; this replica's own is already in its table.
    private void ApplyHotplug(PciAddress address, long revision, ByteString value)
    {
        if (HotplugRecord.Decode(address, value) is not { } record)
            return;
        _broker!.Table.ApplyRemoteHotplug(address, record.Spec, record.Group,
            () => Interlocked.Read(ref _shape) < revision,
            () => Interlocked.Exchange(ref _shape, revision));
    }

    // Another replica's driver bind or unbind, at etcd revision `revision`; this replica's own are already in its table.
    private void ApplyDriver(PciAddress address, long revision, ByteString value) =>
        _broker!.Table.ApplyRemoteDriver(address, DriverRecord.Decode(value),
            () => _drivers.GetValueOrDefault(address) < revision,
            () => _drivers[address] = revision);

    // One change of a group's key, at etcd revision `revision`: a record put, or the key deleted
    // (released, its lease ended, or its last kernel driver unbound). This replica's own puts are
    // already in its table.
    private void Apply(uint groupId, long revision, long created, GroupRecord? record, bool deleted)
    {
        if (!deleted && (record is null || record.Replica == Replica))
            return;
        var owner = deleted || record!.IsKernel ? null : new RemoteOwner(record.Session, record.Replica);
        var fenced = _broker!.Table.ApplyRemote(groupId,
            () => !_revisions.TryGetValue(groupId, out var seen) || seen < revision,
            () => _revisions[groupId] = revision,
            owner, deleted ? 0 : record!.Count, deleted ? 0 : (ulong)created);
        // A session already ending is being torn down: fencing it again would only loop through resyncs.
        if (fenced is not null && fenced.EndReason is null)
        {
            // etcd says a session of ours no longer owns a group it holds here: its lease ended
            // without this replica noticing in time. Stop it now.
            Log.OwnershipLost(_log, groupId, fenced.Id);
            if (_leases.TryGetValue(fenced.Id, out var lazy) && lazy.IsValueCreated)
                lazy.Value.MarkLost();
            _ = EndFencedAsync(fenced, "the session's cluster lease (etcd) ended");
        }
    }

    // Ends a session whose lease is lost, then reloads the table from etcd: changes of its groups
    // that came while it still held them here were not taken, and are now.
    private async Task EndFencedAsync(Session session, string reason)
    {
        // Its DMA stops here, on this thread, before the teardown's turn comes: these are the
        // cases in which another replica may own its groups already (etcd said the lease or the
        // group is gone, or the deadline came).
        session.FenceDmaAt(0);
        await _broker!.Sessions.EndAsync(session, SessionEndReason.LeaseExpired, reason).ConfigureAwait(false);
        try
        {
            await ResyncAsync(_stop.Token).ConfigureAwait(false);
        }
        catch (Exception e) when (e is RpcException or OperationCanceledException or ObjectDisposedException || !_stop.IsCancellationRequested)
        {
            // etcd out of reach, or a change that failed to apply (logged as an error): the watch
            // brings the changes once it reconnects, or tries the change again (it resyncs if it must).
            Log.WatchFailed(_log, e.Message);
        }
    }

    // --- helpers ---

    private GroupRecord Record(ulong sessionId, int count) => new(sessionId, Replica, count);

    private DateTime Deadline() => DateTime.UtcNow + _options.CallTimeout;

    private static void Call(Action call, string what) => Call(() =>
    {
        call();
        return true;
    }, what);

    // An etcd call under a change: EAGAIN when etcd does not answer (`unanswered` is told first: the
    // call may have committed all the same) or the replica is stopping.
    private static T Call<T>(Func<T> call, string what, Action? unanswered = null)
    {
        try
        {
            return call();
        }
        catch (RpcException e)
        {
            unanswered?.Invoke();
            throw new ErrnoException(Errno.EAGAIN, ErrorKind.FailedPrecondition,
                $"the cluster store (etcd) did not answer the {what}: {e.Status.StatusCode}; try again")
            {
                RetryAfter = TimeSpan.FromSeconds(1),
            };
        }
        catch (ObjectDisposedException)
        {
            // The replica is stopping and its etcd client is gone: a call still coming in fails as
            // one etcd did not answer, never as a broker fault (INTERNAL).
            throw new ErrnoException(Errno.EAGAIN, ErrorKind.FailedPrecondition,
                $"the cluster store (etcd) is closed: the replica is stopping; the {what} was not made");
        }
    }

    /// <summary>Stops the watch and the keepalives and revokes the replica's registration; sessions' leases are revoked as they end.</summary>
    public async ValueTask DisposeAsync()
    {
        // Once: a host and its owner may both dispose it.
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        await _stop.CancelAsync().ConfigureAwait(false);
        await _keeper.DisposeAsync().ConfigureAwait(false);
        try
        {
            await _watch.ConfigureAwait(false);
            await _settling.ConfigureAwait(false);
            await _renewal.ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
        }
        if (_registration is { } registration)
            await RevokeAsync(registration).ConfigureAwait(false);
        _client.Dispose();
        _stop.Dispose();
    }

    private static partial class Log
    {
        [LoggerMessage(EventId = 1610, Level = LogLevel.Warning, Message = "Release of group {GroupId} by session {SessionId} not recorded in etcd ({Reason}); the group is settled once etcd answers, or goes free with the session's lease")]
        public static partial void ReleaseNotRecorded(ILogger logger, uint groupId, ulong sessionId, string reason);

        // etcd's answers to a call it refused or did not answer: the status code, then the detail
        // (empty for a deadline that passed).
        [LoggerMessage(EventId = 1622, Level = LogLevel.Warning, Message = "Release of group {GroupId} by session {SessionId} not recorded in etcd ({Code}: {Detail}); the group is settled once etcd answers, or goes free with the session's lease")]
        public static partial void ReleaseNotRecorded(ILogger logger, uint groupId, ulong sessionId, StatusCode code, string detail);

        [LoggerMessage(EventId = 1611, Level = LogLevel.Information, Message = "Revoking etcd lease {LeaseId} failed ({Code}: {Detail}); it expires on its own")]
        public static partial void RevokeFailed(ILogger logger, long leaseId, StatusCode code, string detail);

        [LoggerMessage(EventId = 1612, Level = LogLevel.Information, Message = "etcd watch failed: {Reason}; resuming")]
        public static partial void WatchFailed(ILogger logger, string reason);

        [LoggerMessage(EventId = 1613, Level = LogLevel.Warning, Message = "etcd says group {GroupId} is no longer session {SessionId}'s: ending the session")]
        public static partial void OwnershipLost(ILogger logger, uint groupId, ulong sessionId);

        [LoggerMessage(EventId = 1614, Level = LogLevel.Information, Message = "Claim of group {GroupId} by session {SessionId} was refused on a retry, but etcd holds it as written at revision {Revision}: an earlier attempt committed; the claim stands")]
        public static partial void ClaimFoundCommitted(ILogger logger, uint groupId, ulong sessionId, long revision);

        [LoggerMessage(EventId = 1615, Level = LogLevel.Warning, Message = "After a change etcd did not answer, group {GroupId}'s record held {Count} claims of session {SessionId} where the table holds {TableCount}; etcd is back in line with the table")]
        public static partial void Settled(ILogger logger, uint groupId, ulong sessionId, int count, int tableCount);

        [LoggerMessage(EventId = 1616, Level = LogLevel.Information, Message = "Group {GroupId}'s unanswered change is not settled yet ({Reason}); trying again")]
        public static partial void SettleFailed(ILogger logger, uint groupId, string reason);

        [LoggerMessage(EventId = 1623, Level = LogLevel.Information, Message = "Group {GroupId}'s unanswered change is not settled yet ({Code}: {Detail}); trying again")]
        public static partial void SettleFailed(ILogger logger, uint groupId, StatusCode code, string detail);

        [LoggerMessage(EventId = 1617, Level = LogLevel.Warning, Message = "Replica {Replica}'s registration lease {LeaseId} was not renewed in time; taking the name again under a new lease, claims refused until then")]
        public static partial void RegistrationLost(ILogger logger, string replica, long leaseId);

        [LoggerMessage(EventId = 1618, Level = LogLevel.Information, Message = "Replica {Replica} is registered again, on etcd lease {LeaseId}")]
        public static partial void RegistrationRenewed(ILogger logger, string replica, long leaseId);

        [LoggerMessage(EventId = 1619, Level = LogLevel.Information, Message = "Replica {Replica}'s registration not renewed yet ({Reason}); trying again")]
        public static partial void RegistrationNotRenewed(ILogger logger, string replica, string reason);

        [LoggerMessage(EventId = 1624, Level = LogLevel.Information, Message = "Replica {Replica}'s registration not renewed yet ({Code}: {Detail}); trying again")]
        public static partial void RegistrationNotRenewed(ILogger logger, string replica, StatusCode code, string detail);

        [LoggerMessage(EventId = 1620, Level = LogLevel.Critical, Message = "Another broker took replica name {Replica} while this one was cut off from etcd: this replica refuses every claim from now on; restart it with another --replica")]
        public static partial void NameTaken(ILogger logger, string replica);

        [LoggerMessage(EventId = 1621, Level = LogLevel.Error, Message = "Applying the change of {Key} at etcd revision {Revision} failed ({Failures} in a row); the table is reloaded to try it again")]
        public static partial void ApplyFailed(ILogger logger, string key, long revision, int failures, Exception exception);

        [LoggerMessage(EventId = 1625, Level = LogLevel.Critical, Message = "The change of {Key} at etcd revision {Revision} failed to apply {Failures} times in a row: given up, so the watch goes on; this replica's table misses it until the key changes again")]
        public static partial void ChangeGivenUp(ILogger logger, string key, long revision, int failures, Exception exception);
    }
}
