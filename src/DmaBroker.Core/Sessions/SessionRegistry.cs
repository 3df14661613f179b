using System.Collections.Concurrent;
using System.Security.Cryptography;
using DmaBroker.Core.Access;

namespace DmaBroker.Core.Sessions;

/// <summary>The leases, limits and grace periods every session of a broker gets; the defaults are SPEC's.</summary>
public sealed record SessionOptions
{
    /// <summary>A session that sends nothing for this long ends (SPEC §5: default 3 s).</summary>
    public TimeSpan LeaseTtl { get; init; } = TimeSpan.FromSeconds(3);

    /// <summary>Faults and interrupts buffered per session before new ones are dropped.</summary>
    public int EventBuffer { get; init; } = 1024;

    /// <summary>Memory one session may allocate (like RLIMIT_MEMLOCK); beyond it, ENOMEM.</summary>
    public ulong MemoryLimit { get; init; } = 256UL * 1024 * 1024;

    /// <summary>Mappings per container (type1's dma_entry_limit); beyond it, ENOSPC.</summary>
    public int DmaLimit { get; init; } = 65535;

    /// <summary>
    /// How long a session's teardown waits for its DMA streams to close, once it has released
    /// everything, before it counts the session gone anyway: a wedged connection holds nothing.
    /// </summary>
    public TimeSpan StreamCloseGrace { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>
    /// How long a write to an ending session's stream may still block (its `revoked`, or events
    /// queued before the end) before the broker gives up on a client that stopped reading; and,
    /// when the broker stops, how long the stream then waits for the client to close its side.
    /// </summary>
    public TimeSpan EndingWriteGrace { get; init; } = TimeSpan.FromSeconds(2);
}

/// <summary>Live counts, for operators and leak checks.</summary>
/// <param name="Live">Sessions live and not ending.</param>
/// <param name="Opened">Sessions opened since start.</param>
/// <param name="Closed">Sessions that have begun to end since start.</param>
public readonly record struct SessionCounts(int Live, long Opened, long Closed);

/// <summary>
/// Opens sessions, authenticates their tokens, keeps their leases on an injected clock, and runs
/// each one's teardown exactly once, whichever way it ends.
/// </summary>
public sealed class SessionRegistry(TimeProvider time, SessionOptions options, Action<Session> teardown, Action<Session>? ended = null)
{
    private readonly ConcurrentDictionary<ulong, Session> _byId = new();
    private readonly ConcurrentDictionary<string, Session> _byToken = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, PrincipalLedger> _ledgers = new(StringComparer.Ordinal);
    private long _nextId;
    private long _opened;
    private long _closed;
    private volatile bool _shuttingDown;

    /// <summary>The leases, limits and grace periods every session gets.</summary>
    public SessionOptions Options { get; } = options;

    /// <summary>The id of the first session (1 by default); a cluster gives each replica its own range (SPEC §16).</summary>
    public ulong FirstId { init => _nextId = (long)value - 1; }

    /// <summary>The registry's clock, now: what session ages are measured against.</summary>
    public DateTimeOffset Now => time.GetUtcNow();

    /// <summary>A session stops counting as live, and counts as closed, the moment it starts to end.</summary>
    public SessionCounts Counts => new(_byId.Values.Count(s => !s.Gate.IsRunDown), Interlocked.Read(ref _opened), Interlocked.Read(ref _closed));

    /// <summary>The sessions not yet gone, including those still being torn down; a copy.</summary>
    public IReadOnlyCollection<Session> Live => [.. _byId.Values];

    /// <summary>
    /// Open mode's grant (no auth file): <c>anonymous</c>, every role, no per-principal quota,
    /// and the broker's per-session memory and per-container mapping limits.
    /// </summary>
    public Grant OpenModeGrant => _openGrant ??= new Grant(AccessPolicy.Anonymous, Role.Admin, GroupPolicy.All,
        Quotas.Unlimited(Options.MemoryLimit, Options.DmaLimit));

    private Grant? _openGrant;

    /// <summary>Opens an open-mode session (see <see cref="OpenModeGrant"/>), as in-process callers and tests do.</summary>
    public Session Open(string? clientName = null) => Open(OpenModeGrant, clientName, "");

    /// <summary>
    /// Opens a session for a principal with a fresh id, a 256-bit token and a running lease. Its
    /// quotas are checked first: faster than its Session.Open rate is EAGAIN (with the time to
    /// wait), more live sessions than its quota EMFILE (a session is a file).
    /// </summary>
    public Session Open(Grant grant, string? clientName, string peer)
    {
        if (_shuttingDown)
            throw ErrnoException.Conflict(Errno.EBUSY, "the broker is shutting down");
        var ledger = PrincipalLedger.Limits(grant.Quotas) ? _ledgers.GetOrAdd(grant.Principal, static _ => new PrincipalLedger()) : null;
        ledger?.Admit(grant, time);
        var id = (ulong)Interlocked.Increment(ref _nextId);
        var token = System.Buffers.Text.Base64Url.EncodeToString(RandomNumberGenerator.GetBytes(32));
        var session = new Session(id, token, string.IsNullOrWhiteSpace(clientName) ? $"client-{id}" : clientName,
            time.GetUtcNow(), Options.EventBuffer, grant, peer, time);
        // The lease exists before anyone can find the session, so a teardown always disposes it.
        session.RenewedAt = time.GetTimestamp();
        session.Lease = time.CreateTimer(static s => ((LeaseState)s!).Expire(), new LeaseState(this, session),
            Options.LeaseTtl, Timeout.InfiniteTimeSpan);
        _byId[id] = session;
        _byToken[token] = session;
        Interlocked.Increment(ref _opened);
        if (_shuttingDown)
        {
            // Shutdown began after the check above and may have missed this session: end it here.
            _ = EndAsync(session, SessionEndReason.Shutdown);
            throw ErrnoException.Conflict(Errno.EBUSY, "the broker is shutting down");
        }
        return session;
    }

    /// <summary>
    /// The live session a token names; UNAUTHENTICATED when missing, unknown or ended, and, when
    /// <paramref name="principal"/> is given, when another principal opened it (exactly as unknown:
    /// a stolen token is worth nothing, and says nothing).
    /// </summary>
    public Session Authenticate(string? token, string? principal = null)
    {
        if (string.IsNullOrEmpty(token))
            throw ErrnoException.Unauthenticated("missing session token: open a session with Session.Open and send its token as metadata 'dmabroker-session-token'");
        if (!_byToken.TryGetValue(token, out var session) || session.Gate.IsRunDown
            || (principal is not null && !string.Equals(principal, session.Principal, StringComparison.Ordinal)))
            throw ErrnoException.Unauthenticated("unknown or ended session token");
        return session;
    }

    /// <summary>
    /// The live sessions <paramref name="caller"/> may see, oldest first: viewers and admins see
    /// all; a principal whose highest role is user sees only its own (SPEC §12).
    /// </summary>
    public IReadOnlyList<Session> Visible(Grant caller) =>
        [.. _byId.Values.Where(s => !s.Gate.IsRunDown && (caller.Role != Role.User || s.Principal == caller.Principal)).OrderBy(s => s.Id)];

    /// <summary>The live session with this public id (an admin names sessions so); ENOENT if none or ending.</summary>
    public Session Find(ulong id) =>
        TryFind(id) ?? throw ErrnoException.NotFound(Errno.ENOENT, $"no live session {id}");

    /// <summary>The live session with this public id, or null if none or ending (views that name owners).</summary>
    public Session? TryFind(ulong id) =>
        _byId.TryGetValue(id, out var s) && !s.Gate.IsRunDown ? s : null;

    /// <summary>The session with this public id, live or still being torn down; null once it is gone.</summary>
    internal Session? Get(ulong id) => _byId.GetValueOrDefault(id);

    /// <summary>Renews the lease: the client said something.</summary>
    public void Touch(Session session)
    {
        if (session.Gate.IsRunDown)
            return;
        session.RenewedAt = time.GetTimestamp();
        session.Lease?.Change(Options.LeaseTtl, Timeout.InfiniteTimeSpan);
        Renewed?.Invoke(session);
    }

    /// <summary>
    /// Told of every lease renewal, after it (on the thread that read the client's message): how a
    /// test learns that the broker has read the pings it sent before it moves a fake clock on.
    /// </summary>
    internal Action<Session>? Renewed { get; set; }

    /// <summary>
    /// Revokes a live session and waits until everything it held is released. An admin may revoke
    /// any session; anyone else (<paramref name="caller"/> given) only its own principal's.
    /// </summary>
    public Task RevokeAsync(ulong id, string? message, Grant? caller = null)
    {
        if (message?.Length > MaxReasonLength)
            throw ErrnoException.Invalid($"a revocation reason is at most {MaxReasonLength} characters, not {message.Length}");
        var session = Find(id);
        if (caller is not null && !caller.Permits(Role.Admin) && !string.Equals(caller.Principal, session.Principal, StringComparison.Ordinal))
            throw ErrnoException.Denied($"{caller.Principal} may revoke only its own sessions; session {id} is another principal's");
        var revoker = caller is null || caller.Permits(Role.Admin) ? "admin" : caller.Principal;
        return EndAsync(session, SessionEndReason.Revoked, string.IsNullOrWhiteSpace(message) ? $"revoked by {revoker}" : message);
    }

    /// <summary>
    /// Cuts a session's connection (LINK_DOWN): it ends as connection lost, marked
    /// <see cref="Session.ConnectionCut"/> so the host aborts its calls; completes once everything
    /// it held is released. A session already ending keeps its own end.
    /// </summary>
    public Task CutConnectionAsync(Session session, string message) => End(session, SessionEndReason.ConnectionLost, message, cut: true, inline: false);

    /// <summary>The longest revocation reason, which the revoked client is sent.</summary>
    public const int MaxReasonLength = 256;

    /// <summary>
    /// Ends a session; the first call runs the teardown, every call returns the same task. Order
    /// (SPEC §5): no new operation or DMA is admitted, the ones in flight complete, then the
    /// teardown releases devices, containers and ownership; only then is the session gone.
    /// </summary>
    public Task EndAsync(Session session, SessionEndReason reason, string? message = null) => End(session, reason, message, cut: false, inline: false);

    /// <summary>
    /// As <see cref="EndAsync"/>, but the teardown starts on the calling thread and runs on it until
    /// it first has to wait (for operations still in flight), instead of being queued to the thread
    /// pool: the groups of a session whose connection died are released and published without
    /// waiting behind other sessions' queued work. Only for a caller that holds no lock and may run
    /// the teardown itself, as the session's own stream does when it ends.
    /// </summary>
    public Task EndInlineAsync(Session session, SessionEndReason reason, string? message = null) => End(session, reason, message, cut: false, inline: true);

    private Task End(Session session, SessionEndReason reason, string? message, bool cut, bool inline)
    {
        Task<Task> start;
        Task teardownTask;
        lock (session.Sync)
        {
            if (session.Teardown is { } running)
                return running;
            session.ConnectionCut = cut;
            session.EndReason = reason;
            session.EndingSince = time.GetTimestamp();
            session.EndMessage = message ?? Describe(reason);
            // Created here, so every caller gets the same task; started below, outside the session's
            // lock, since the teardown takes locks above it (docs/locking.md).
            start = new Task<Task>(static state =>
            {
                var (registry, ending) = ((SessionRegistry, Session))state!;
                return registry.RunTeardownAsync(ending);
            }, (this, session));
            teardownTask = session.Teardown = start.Unwrap();
        }
        if (inline)
            start.RunSynchronously(TaskScheduler.Default);
        else
            start.Start(TaskScheduler.Default);
        return teardownTask;
    }

    private async Task RunTeardownAsync(Session session)
    {
        session.Lease?.Dispose();
        session.SignalEnding();
        var drained = session.Gate.RundownAsync();
        // Counted closed before the teardown publishes anything: whoever sees its groups released
        // must not still count it (it is already unreachable by token and id).
        Interlocked.Increment(ref _closed);
        await drained.ConfigureAwait(false);
        try
        {
            teardown(session);
            // Its streams were told to stop when the session began to end; the session counts as
            // gone once they have (bounded, so a wedged connection cannot hold teardown hostage).
            await session.WhenStreamsClosed().WaitAsync(Options.StreamCloseGrace, time).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            // A stream that will not finish still holds nothing: its session is released.
        }
        finally
        {
            _byToken.TryRemove(session.Token, out _);
            _byId.TryRemove(session.Id, out _);
            if (_ledgers.TryGetValue(session.Principal, out var ledger))
                ledger.Release();
            session.CompleteEvents();
            ended?.Invoke(session);
        }
    }

    /// <summary>Ends every session (broker shutdown) and refuses new ones.</summary>
    public Task ShutdownAsync()
    {
        _shuttingDown = true;
        return Task.WhenAll(_byId.Values.Select(s => EndAsync(s, SessionEndReason.Shutdown)));
    }

    private static string Describe(SessionEndReason reason) => reason switch
    {
        SessionEndReason.ClientClosed => "closed by client",
        SessionEndReason.ConnectionLost => "connection lost",
        SessionEndReason.LeaseExpired => "lease expired",
        SessionEndReason.Revoked => "revoked by admin",
        SessionEndReason.Shutdown => "broker shutting down",
        _ => reason.ToString(),
    };

    // What is left of the session's lease: the TTL less the time since it was last renewed.
    private TimeSpan LeaseLeft(Session session) => Options.LeaseTtl - time.GetElapsedTime(session.RenewedAt);

    private sealed record LeaseState(SessionRegistry Registry, Session Session)
    {
        public void Expire()
        {
            // A timer callback waits its turn behind other queued work, and so do the client's
            // pings: a broker that fell behind may read a ping that came in time only after the
            // lease fell due and this callback was queued. That renewal counts: the lease runs on
            // from it. (So does the little a real clock's timer may fire early by.)
            var left = Registry.LeaseLeft(Session);
            if (left <= TimeSpan.Zero)
            {
                _ = Registry.EndAsync(Session, SessionEndReason.LeaseExpired);
                return;
            }
            try
            {
                Session.Lease?.Change(left, Timeout.InfiniteTimeSpan);
            }
            catch (ObjectDisposedException)
            {
                // The session ended meanwhile, and its teardown disposed the lease.
            }
        }
    }

    /// <summary>
    /// One principal's live sessions and its Session.Open rate, a token bucket as deep as the rate
    /// that refills at the rate per second on the registry's clock.
    /// </summary>
    private sealed class PrincipalLedger
    {
        private readonly Lock _sync = new();
        private int _live;
        private double _tokens = double.NaN;
        private long _refilledAt;

        /// <summary>Whether the quotas limit anything a ledger counts (open mode's do not).</summary>
        public static bool Limits(Quotas quotas) => quotas.Sessions != int.MaxValue || quotas.OpensPerSecond != int.MaxValue;

        /// <summary>Takes one open from the bucket and one session from the quota, or throws EAGAIN / EMFILE.</summary>
        public void Admit(Grant grant, TimeProvider time)
        {
            var quotas = grant.Quotas;
            lock (_sync)
            {
                var now = time.GetTimestamp();
                var rate = (double)quotas.OpensPerSecond;
                _tokens = double.IsNaN(_tokens)
                    ? rate
                    : Math.Min(rate, _tokens + (time.GetElapsedTime(_refilledAt, now).TotalSeconds * rate));
                _refilledAt = now;
                if (_tokens < 1)
                {
                    var wait = rate > 0 ? TimeSpan.FromSeconds((1 - _tokens) / rate) : TimeSpan.FromSeconds(1);
                    throw new ErrnoException(Errno.EAGAIN, ErrorKind.ResourceExhausted,
                        $"{grant.Principal} opens sessions faster than its quota of {quotas.OpensPerSecond} per second; retry in {Math.Ceiling(wait.TotalMilliseconds)} ms")
                    {
                        RetryAfter = wait,
                    };
                }
                _tokens -= 1;
                if (_live >= quotas.Sessions)
                    throw ErrnoException.Exhausted(Errno.EMFILE, $"{grant.Principal} has {_live} live session(s), its quota");
                _live++;
            }
        }

        /// <summary>A session of the principal is gone.</summary>
        public void Release()
        {
            lock (_sync)
                _live--;
        }
    }
}
