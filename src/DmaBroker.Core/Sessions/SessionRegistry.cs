using System.Collections.Concurrent;
using System.Security.Cryptography;

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
    /// queued before the end) before the broker gives up on a client that stopped reading.
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
    private long _nextId;
    private long _opened;
    private long _closed;
    private volatile bool _shuttingDown;

    /// <summary>The leases, limits and grace periods every session gets.</summary>
    public SessionOptions Options { get; } = options;

    /// <summary>A session stops counting as live, and counts as closed, the moment it starts to end.</summary>
    public SessionCounts Counts => new(_byId.Values.Count(s => !s.Gate.IsRunDown), Interlocked.Read(ref _opened), Interlocked.Read(ref _closed));

    /// <summary>The sessions not yet gone, including those still being torn down; a copy.</summary>
    public IReadOnlyCollection<Session> Live => [.. _byId.Values];

    /// <summary>Opens a session with a fresh id, a 256-bit token and a running lease.</summary>
    public Session Open(string? clientName = null)
    {
        if (_shuttingDown)
            throw ErrnoException.Conflict(Errno.EBUSY, "the broker is shutting down");
        var id = (ulong)Interlocked.Increment(ref _nextId);
        var token = System.Buffers.Text.Base64Url.EncodeToString(RandomNumberGenerator.GetBytes(32));
        var session = new Session(id, token, string.IsNullOrWhiteSpace(clientName) ? $"client-{id}" : clientName,
            time.GetUtcNow(), Options.EventBuffer, Options.MemoryLimit);
        // The lease exists before anyone can find the session, so a teardown always disposes it.
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

    /// <summary>The live session a token names; UNAUTHENTICATED when missing, unknown or ended.</summary>
    public Session Authenticate(string? token)
    {
        if (string.IsNullOrEmpty(token))
            throw ErrnoException.Unauthenticated("missing session token: open a session with Session.Open and send its token as metadata 'dmabroker-session-token'");
        if (!_byToken.TryGetValue(token, out var session) || session.Gate.IsRunDown)
            throw ErrnoException.Unauthenticated("unknown or ended session token");
        return session;
    }

    /// <summary>The live session with this public id (an admin names sessions so); ENOENT if none or ending.</summary>
    public Session Find(ulong id) =>
        _byId.TryGetValue(id, out var s) && !s.Gate.IsRunDown
            ? s
            : throw ErrnoException.NotFound(Errno.ENOENT, $"no live session {id}");

    /// <summary>Renews the lease: the client said something.</summary>
    public void Touch(Session session)
    {
        if (!session.Gate.IsRunDown)
            session.Lease?.Change(Options.LeaseTtl, Timeout.InfiniteTimeSpan);
    }

    /// <summary>Revokes a live session and waits until everything it held is released.</summary>
    public Task RevokeAsync(ulong id, string? message)
    {
        if (message?.Length > MaxReasonLength)
            throw ErrnoException.Invalid($"a revocation reason is at most {MaxReasonLength} characters, not {message.Length}");
        return EndAsync(Find(id), SessionEndReason.Revoked, string.IsNullOrWhiteSpace(message) ? "revoked by admin" : message);
    }

    /// <summary>The longest revocation reason, which the revoked client is sent.</summary>
    public const int MaxReasonLength = 256;

    /// <summary>
    /// Ends a session; the first call runs the teardown, every call returns the same task. Order
    /// (SPEC §5): no new operation or DMA is admitted, the ones in flight complete, then the
    /// teardown releases devices, containers and ownership; only then is the session gone.
    /// </summary>
    public Task EndAsync(Session session, SessionEndReason reason, string? message = null)
    {
        Task teardownTask;
        lock (session.Sync)
        {
            if (session.Teardown is { } running)
                return running;
            session.EndReason = reason;
            session.EndMessage = message ?? Describe(reason);
            teardownTask = session.Teardown = RunTeardownAsync(session);
        }
        return teardownTask;
    }

    private async Task RunTeardownAsync(Session session)
    {
        await Task.Yield();
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

    private sealed record LeaseState(SessionRegistry Registry, Session Session)
    {
        public void Expire() => _ = Registry.EndAsync(Session, SessionEndReason.LeaseExpired);
    }
}
