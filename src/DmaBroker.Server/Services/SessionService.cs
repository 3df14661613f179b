using DmaBroker.Core;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Sessions;
using DmaBroker.Server.Hosting;
using Grpc.Core;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Services;

/// <summary>
/// Session.Open: the stream is the session. Reading renews the lease; one writer task sends
/// `opened`, then faults and interrupts, then `revoked` if the broker ended it. However the
/// stream ends, the session is torn down before the call completes; when the broker stops, the
/// call also waits (a grace at most) for the client to close its side after `revoked`.
/// </summary>
public sealed partial class SessionService(Broker broker, SessionCalls calls, TimeProvider time, ILogger<SessionService> logger) : Wire.Session.SessionBase
{
    public override async Task Open(IAsyncStreamReader<Wire.SessionRequest> requestStream,
        IServerStreamWriter<Wire.SessionEvent> responseStream, ServerCallContext context)
    {
        // Counted before the session exists, so that stopping, which refuses new sessions first, waits for every call that has one;
        // and counted until Kestrel has sent the stream's end (the response's OnCompleted), not only
        // until this method returns: a stream Kestrel is still ending when it begins to stop keeps
        // its connection open until the client next sends a frame (see SessionShutdown).
        context.GetHttpContext().Response.RegisterForDispose(calls.Enter());
        var session = broker.Sessions.Open(context.Caller().Grant, null, context.Peer);
        LogOpened(logger, session.Id, context.Peer);
        using var ended = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken, session.Ending);
        // Stopping waits for this call a grace at most: then it stops waiting on the client as if the call were aborted.
        using var aborted = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken, calls.Overdue);
        var writer = WriteEventsAsync(session, responseStream, aborted.Token);
        var reason = SessionEndReason.ClientClosed;
        var clientClosed = false;
        RpcException? malformed = null;
        try
        {
            while (await requestStream.MoveNext(ended.Token))
            {
                broker.Sessions.Touch(session);
                if (requestStream.Current.Hello is { } hello)
                    session.Rename(hello.ClientName);
            }
            clientClosed = true;
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.InvalidArgument && !context.CancellationToken.IsCancellationRequested)
        {
            // A frame that is not a SessionRequest (the parser's EINVAL): the session ends, and
            // the call fails with that error once everything is released.
            malformed = e;
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or RpcException)
        {
            // The broker ended the session (its reason stands), or else the stream broke without
            // the client closing it: the call was cancelled or the connection died. That is a lost
            // connection whether or not Kestrel has signalled the call's abort yet: it does so
            // from the thread pool, so the read can fail first.
            reason = session.Ending.IsCancellationRequested ? reason : SessionEndReason.ConnectionLost;
        }
        finally
        {
            try
            {
                // Here, on this thread, not queued behind other sessions' work: this is the path
                // from a dead connection to the published release.
                await broker.Sessions.EndInlineAsync(session, reason, malformed is null ? null : "malformed request on the session stream");
            }
            finally
            {
                var told = await writer;
                if (told && !clientClosed && session.EndReason == SessionEndReason.Shutdown)
                    await AwaitClientCloseAsync(requestStream, aborted.Token);
                LogEnded(logger, session.Id, session.ClientName, session.EndMessage ?? "");
                // LINK_DOWN (SPEC §14): the client must see what a dead link shows, a reset stream, not a completed call.
                if (session.ConnectionCut)
                    context.GetHttpContext().Abort();
            }
        }
        if (malformed is not null)
            throw malformed;
    }

    // The stream's only writer; true once it has written `revoked`.
    private async Task<bool> WriteEventsAsync(Session session, IServerStreamWriter<Wire.SessionEvent> stream, CancellationToken callAborted)
    {
        try
        {
            await stream.WriteAsync(new Wire.SessionEvent
            {
                Opened = new Wire.Opened
                {
                    SessionId = session.Id,
                    Token = session.Token,
                    LeaseTtlMs = (uint)broker.Sessions.Options.LeaseTtl.TotalMilliseconds,
                    Principal = session.Principal,
                },
            }, callAborted);
            // Once the session ends, a write blocked by a client that stopped reading gets a grace more.
            using var writes = new GraceBound(time, broker.Sessions.Options.EndingWriteGrace, callAborted);
            using var onEnd = session.Ending.Register(static s => ((GraceBound)s!).Arm(), writes);
            await foreach (var ev in session.Events.ReadAllAsync(session.Ending))
                await stream.WriteAsync(ToProto(ev), writes.Token);
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or InvalidOperationException or RpcException)
        {
            // The session is ending or the client is gone.
        }
        if (session.EndReason is SessionEndReason.LeaseExpired or SessionEndReason.Revoked or SessionEndReason.Shutdown
            && !callAborted.IsCancellationRequested)
        {
            try
            {
                // A client that no longer reads must not keep this call open: the session is gone already.
                using var bounded = new GraceBound(time, broker.Sessions.Options.EndingWriteGrace, callAborted);
                bounded.Arm();
                await stream.WriteAsync(new Wire.SessionEvent { Revoked = new Wire.Revoked { Reason = session.EndMessage ?? "" } }, bounded.Token);
                return true;
            }
            catch (Exception e) when (e is OperationCanceledException or IOException or InvalidOperationException or RpcException)
            {
                // The client is gone: nobody to tell.
            }
        }
        return false;
    }

    // The broker is stopping, and once this call completes the server closes the connection as soon
    // as it can; a client whose side of the stream is still open then loses what it has received
    // but not yet read, `revoked` included (the .NET HTTP/2 client discards it). A client that has
    // closed its side has read everything, so the call waits for that, or for the grace.
    private async Task AwaitClientCloseAsync(IAsyncStreamReader<Wire.SessionRequest> requests, CancellationToken callAborted)
    {
        using var grace = new GraceBound(time, broker.Sessions.Options.EndingWriteGrace, callAborted);
        grace.Arm();
        try
        {
            while (await requests.MoveNext(grace.Token))
            {
                // The session is gone: whatever the client still sends means nothing.
            }
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or InvalidOperationException or RpcException)
        {
            // The grace has passed, or the client is gone.
        }
    }

    /// <summary>
    /// Cancels writes to (or reads from) the stream when the call is aborted, or a grace (the
    /// session options' <c>EndingWriteGrace</c>) after <see cref="Arm"/>, on the broker's clock.
    /// </summary>
    private sealed class GraceBound : IDisposable
    {
        private readonly CancellationTokenSource _source;
        private readonly CancellationTokenRegistration _aborted;
        private readonly TimeSpan _grace;

        public GraceBound(TimeProvider time, TimeSpan grace, CancellationToken callAborted)
        {
            _source = new CancellationTokenSource(Timeout.InfiniteTimeSpan, time);
            _aborted = callAborted.Register(static s => ((CancellationTokenSource)s!).Cancel(), _source);
            _grace = grace;
        }

        public CancellationToken Token => _source.Token;

        public void Arm() => _source.CancelAfter(_grace);

        public void Dispose()
        {
            // The registration first: its disposal waits out a cancel already running.
            _aborted.Dispose();
            _source.Dispose();
        }
    }

    private static Wire.SessionEvent ToProto(SessionEvent ev) => ev switch
    {
        FaultEvent f => new Wire.SessionEvent
        {
            Fault = new Wire.Fault
            {
                Address = f.Address.ToString(),
                Iova = f.Iova,
                Access = f.Access == DmaAccess.Write ? Wire.Access.Write : Wire.Access.Read,
                Reason = (Wire.FaultReason)(int)f.Reason,
            },
        },
        InterruptEvent i => new Wire.SessionEvent { Interrupt = new Wire.Interrupt { Handle = i.Handle, Vector = i.Vector } },
        DeviceRemovedEvent r => new Wire.SessionEvent { DeviceRemoved = new Wire.DeviceRemoved { Address = r.Address.ToString() } },
        _ => throw new ArgumentOutOfRangeException(nameof(ev)),
    };

    [LoggerMessage(EventId = 200, EventName = "SessionOpened", Level = LogLevel.Information, Message = "session {SessionId} opened from {Peer}")]
    private static partial void LogOpened(ILogger logger, ulong sessionId, string peer);

    [LoggerMessage(EventId = 201, EventName = "SessionEnded", Level = LogLevel.Information, Message = "session {SessionId} ({ClientName}) ended: {Reason}; everything it held is released")]
    private static partial void LogEnded(ILogger logger, ulong sessionId, string clientName, string reason);
}
