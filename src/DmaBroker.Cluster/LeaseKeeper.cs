using System.Collections.Concurrent;
using Etcdserverpb;
using Grpc.Core;
using Microsoft.Extensions.Logging;

namespace DmaBroker.Cluster;

/// <summary>
/// Keeps this replica's etcd leases alive and fences the ones it cannot (SPEC §16). Every tick of
/// the broker's clock (a sixth of the TTL) it sends one keepalive per lease on one stream; twice
/// as often, on a timer that waits for no I/O, it fences every lease etcd could expire within the
/// safety margin (a third of the TTL): the margin covers the check's own period and the session's
/// teardown, so the session's DMA has stopped before etcd can have freed its groups for another
/// replica. Each renewal also moves the session's DMA fence (<c>Session.FenceDmaAt</c>) to half the
/// margin before the lease can expire: every device access checks it, so DMA stops on time even
/// when the fencing timer does not run on time (a replica thawed after SIGSTOP may take up the DMA
/// queued to it before its timer runs).
/// </summary>
internal sealed partial class LeaseKeeper : IAsyncDisposable
{
    private readonly Lease.LeaseClient _client;
    private readonly TimeProvider _time;
    private readonly ILogger _log;
    private readonly Action<SessionLease> _fence;
    private readonly ConcurrentDictionary<long, SessionLease> _leases = new();
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _loop;
    // The one keepalive stream; written by the tick loop alone, replaced when it breaks.
    private AsyncDuplexStreamingCall<LeaseKeepAliveRequest, LeaseKeepAliveResponse>? _stream;
    // The number of the keepalive stream last opened (written by Open, read by the ticks).
    private long _streamId;

    public LeaseKeeper(Lease.LeaseClient client, TimeProvider time, TimeSpan ttl, ILogger log, Action<SessionLease> fence)
    {
        _client = client;
        _time = time;
        _log = log;
        _fence = fence;
        Interval = ttl / 6;
        Margin = ttl / 3;
        _loop = Task.WhenAll(RunAsync(), CheckAsync());
    }

    /// <summary>How often keepalives go out and deadlines are checked.</summary>
    public TimeSpan Interval { get; }

    /// <summary>How long before etcd could expire a lease the replica fences it.</summary>
    public TimeSpan Margin { get; }

    /// <summary>Keeps <paramref name="lease"/> alive from now on.</summary>
    public void Track(SessionLease lease)
    {
        FenceDma(lease);
        _leases[lease.Id] = lease;
    }

    /// <summary>Stops keeping <paramref name="lease"/>.</summary>
    public void Forget(SessionLease lease) => _leases.TryRemove(lease.Id, out _);

    /// <summary>Leases kept now.</summary>
    public int Count => _leases.Count;

    private async Task RunAsync()
    {
        using var timer = new PeriodicTimer(Interval, _time);
        try
        {
            while (await timer.WaitForNextTickAsync(_stop.Token).ConfigureAwait(false))
                await TickAsync().ConfigureAwait(false);
        }
        catch (Exception) when (_stop.IsCancellationRequested)
        {
            // Stopping: a write in flight is cancelled with its call.
        }
    }

    // The deadlines, on a timer of their own that waits for no I/O, twice per keepalive: a
    // fence comes at most half an interval after it is due, well inside the margin.
    private async Task CheckAsync()
    {
        using var timer = new PeriodicTimer(Interval / 2, _time);
        try
        {
            while (await timer.WaitForNextTickAsync(_stop.Token).ConfigureAwait(false))
            {
                var now = _time.GetTimestamp();
                foreach (var lease in _leases.Values)
                {
                    if (lease.FenceDue(now, Margin, _time))
                    {
                        Log.Fencing(_log, lease.Id, lease.Session?.Id ?? 0);
                        _fence(lease);
                    }
                }
            }
        }
        catch (OperationCanceledException) when (_stop.IsCancellationRequested)
        {
        }
    }

    private async Task TickAsync()
    {
        var stream = _stream ??= Open();
        var streamId = Volatile.Read(ref _streamId);
        // A write that a partition stalls must not hold up the next tick's deadline checks.
        using var bounded = new CancellationTokenSource(Interval, _time);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(bounded.Token, _stop.Token);
        try
        {
            foreach (var lease in _leases.Values)
            {
                if (lease.Lost)
                    continue;
                lease.Sent(_time.GetTimestamp(), streamId);
                await stream.RequestStream.WriteAsync(new LeaseKeepAliveRequest { ID = lease.Id }, linked.Token).ConfigureAwait(false);
            }
        }
        catch (Exception e) when (!_stop.IsCancellationRequested)
        {
            // The member went away: the next tick opens a new stream (to any member). Until a
            // keepalive is answered again, the deadlines run out and the leases are fenced.
            Log.KeepAliveFailed(_log, e.Message);
            Drop(stream);
        }
    }

    private AsyncDuplexStreamingCall<LeaseKeepAliveRequest, LeaseKeepAliveResponse> Open()
    {
        var stream = _client.LeaseKeepAlive(cancellationToken: _stop.Token);
        // Numbered up from 1 (0 is the grant's): a lease pairs each answer with a send of the same stream.
        _ = ReadAsync(stream, Interlocked.Increment(ref _streamId));
        return stream;
    }

    private async Task ReadAsync(AsyncDuplexStreamingCall<LeaseKeepAliveRequest, LeaseKeepAliveResponse> stream, long streamId)
    {
        try
        {
            while (await stream.ResponseStream.MoveNext(_stop.Token).ConfigureAwait(false))
            {
                var answer = stream.ResponseStream.Current;
                if (!_leases.TryGetValue(answer.ID, out var lease))
                    continue;
                if (lease.Answered(TimeSpan.FromSeconds(answer.TTL), _time, streamId))
                {
                    FenceDma(lease);
                }
                else
                {
                    // etcd says the lease is gone (TTL 0): whatever the clock says, stop now.
                    if (lease.MarkLost() || answer.TTL <= 0)
                    {
                        Log.LeaseGone(_log, lease.Id, lease.Session?.Id ?? 0);
                        _fence(lease);
                    }
                }
            }
        }
        catch (Exception e) when (!_stop.IsCancellationRequested)
        {
            Log.KeepAliveFailed(_log, e.Message);
        }
        catch (OperationCanceledException)
        {
        }
        Drop(stream);
    }

    // The session's DMA stops half the margin before etcd could expire its lease: after the fencing
    // timer should have ended the session, before the group can be another replica's.
    private void FenceDma(SessionLease lease) =>
        lease.Session?.FenceDmaAt(lease.AliveUntil - (long)(Margin.TotalSeconds / 2 * _time.TimestampFrequency));

    private void Drop(AsyncDuplexStreamingCall<LeaseKeepAliveRequest, LeaseKeepAliveResponse> stream)
    {
        if (Interlocked.CompareExchange(ref _stream, null, stream) == stream)
            stream.Dispose();
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        await _loop.ConfigureAwait(false);
        _stream?.Dispose();
        _stop.Dispose();
    }

    private static partial class Log
    {
        [LoggerMessage(EventId = 1601, Level = LogLevel.Warning, Message = "Fencing etcd lease {LeaseId} of session {SessionId}: not renewed in time; its DMA stops and the session ends")]
        public static partial void Fencing(ILogger logger, long leaseId, ulong sessionId);

        [LoggerMessage(EventId = 1602, Level = LogLevel.Warning, Message = "etcd lease {LeaseId} of session {SessionId} is gone; its DMA stops and the session ends")]
        public static partial void LeaseGone(ILogger logger, long leaseId, ulong sessionId);

        [LoggerMessage(EventId = 1603, Level = LogLevel.Information, Message = "etcd keepalive stream failed: {Reason}; reopening on the next tick")]
        public static partial void KeepAliveFailed(ILogger logger, string reason);
    }
}
