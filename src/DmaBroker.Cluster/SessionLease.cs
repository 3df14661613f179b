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
    private readonly Queue<long> _sent = new();
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

    /// <summary>A keepalive (or the grant) leaves at <paramref name="timestamp"/>.</summary>
    public void Sent(long timestamp)
    {
        lock (_sync)
            _sent.Enqueue(timestamp);
    }

    /// <summary>
    /// etcd answered the oldest keepalive in flight with <paramref name="ttl"/> (0: the lease is
    /// gone). Returns false when the lease is, or now turns out to be, lost.
    /// </summary>
    public bool Answered(TimeSpan ttl, TimeProvider time)
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
            if (_sent.TryDequeue(out var sentAt))
                _aliveUntil = Math.Max(_aliveUntil, sentAt + (long)(ttl.TotalSeconds * time.TimestampFrequency));
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
