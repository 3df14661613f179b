using DmaBroker.Core.Sessions;

namespace DmaBroker.Cluster;

/// <summary>
/// A session's etcd lease as its replica knows it: the latest moment, on the broker's clock, at
/// which etcd cannot yet have expired it. A keepalive sent at <c>t</c> and answered with TTL
/// <c>T</c> proves the lease alive until at least <c>t + T</c> (etcd restarts its countdown when
/// the request arrives, which is after <c>t</c>), so the replica never believes a lease alive longer
/// than etcd keeps it. Fields change under the lease's own lock.
/// </summary>
internal sealed class SessionLease(long id, Session? session, TimeSpan ttl)
{
    private readonly Lock _sync = new();
    // Keepalives in flight, oldest first, each with the keepalive stream it went out on.
    private readonly Queue<(long Stream, long At)> _sent = new();
    private long _aliveUntil;
    private bool _lost;

    /// <summary>The etcd lease id.</summary>
    public long Id { get; } = id;

    /// <summary>The session it keeps, or null for the replica's own registration.</summary>
    public Session? Session { get; } = session;

    /// <summary>The TTL etcd granted.</summary>
    public TimeSpan Ttl { get; } = ttl;

    /// <summary>True once the replica has given the lease up for lost: it renews it no more and fences its session.</summary>
    public bool Lost
    {
        get
        {
            lock (_sync)
                return _lost;
        }
    }

    /// <summary>The latest moment, a timestamp of the broker's clock, at which etcd cannot yet have expired the lease.</summary>
    public long AliveUntil
    {
        get
        {
            lock (_sync)
                return _aliveUntil;
        }
    }

    /// <summary>
    /// The mod revision of the session's record key as this replica last wrote or read it: every
    /// claim and release of the session compares it, so moving it (<c>EtcdOwnershipStore.Settle</c>)
    /// fences off every transaction of the session still in flight. 0 for the registration.
    /// </summary>
    public long Fence => Interlocked.Read(ref _fence);

    private long _fence;

    /// <summary>The record key is at <paramref name="revision"/> or later.</summary>
    public void MoveFence(long revision)
    {
        var seen = Interlocked.Read(ref _fence);
        while (revision > seen && Interlocked.CompareExchange(ref _fence, revision, seen) is var was && was != seen)
            seen = was;
    }

    /// <summary>A keepalive (or the grant, stream 0) leaves at <paramref name="timestamp"/> on keepalive stream <paramref name="stream"/> (numbered up).</summary>
    public void Sent(long timestamp, long stream = 0)
    {
        lock (_sync)
            _sent.Enqueue((stream, timestamp));
    }

    /// <summary>
    /// etcd answered, on keepalive stream <paramref name="stream"/>, the oldest keepalive in flight
    /// on it with <paramref name="ttl"/> (0: the lease is gone). Keepalives of earlier streams are
    /// never answered (their stream broke, or a write was cut short): they are dropped, so that an
    /// answer is never paired with an older send, which would leave the lease looking older than it
    /// is for good. An answer with no send of its stream in flight proves nothing and is ignored.
    /// Returns false when the lease is, or now turns out to be, lost.
    /// </summary>
    public bool Answered(TimeSpan ttl, TimeProvider time, long stream = 0)
    {
        lock (_sync)
        {
            if (_lost)
                return false;
            if (ttl <= TimeSpan.Zero)
            {
                _lost = true;
                return false;
            }
            while (_sent.TryPeek(out var stale) && stale.Stream < stream)
                _sent.Dequeue();
            if (_sent.TryPeek(out var sent) && sent.Stream == stream)
            {
                _sent.Dequeue();
                _aliveUntil = Math.Max(_aliveUntil, sent.At + (long)(ttl.TotalSeconds * time.TimestampFrequency));
            }
            return true;
        }
    }

    /// <summary>
    /// Whether the lease must be fenced at <paramref name="now"/>: etcd could expire it within
    /// <paramref name="margin"/>. The first true marks it lost; later calls return false.
    /// </summary>
    public bool FenceDue(long now, TimeSpan margin, TimeProvider time)
    {
        lock (_sync)
        {
            if (_lost || now < _aliveUntil - (long)(margin.TotalSeconds * time.TimestampFrequency))
                return false;
            _lost = true;
            return true;
        }
    }

    /// <summary>Gives the lease up (its session ended, or etcd said it is gone): it is fenced no more and renewed no more.</summary>
    public bool MarkLost()
    {
        lock (_sync)
        {
            var was = _lost;
            _lost = true;
            return !was;
        }
    }
}
