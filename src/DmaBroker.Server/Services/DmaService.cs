using System.Buffers;
using System.Threading.Channels;
using DmaBroker.Core;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Vfio;
using DmaBroker.Server.Hosting;
using Google.Protobuf;
using Grpc.Core;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Services;

/// <summary>
/// Dma.Stream: one open device handle per stream. Requests run in order, each producing exactly
/// one completion (a coalesced batch: one batch_completion for all its requests); completions and
/// the device's interrupts go through a bounded outbox to the stream's single writer. When the
/// outbox is full the loop stops reading requests, so HTTP/2 flow control holds a fast client back
/// instead of the broker buffering without bound.
/// </summary>
public sealed class DmaService(Broker broker, TimeProvider time) : Wire.Dma.DmaBase
{
    private const int OutboxCapacity = 256;

    public override async Task Stream(IAsyncStreamReader<Wire.DmaRequest> requestStream,
        IServerStreamWriter<Wire.DmaResponse> responseStream, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        using var counted = session.TrackStream();
        using var ended = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken, session.Ending);
        DeviceHandle handle;
        try
        {
            if (!await requestStream.MoveNext(ended.Token))
                return;
            if (requestStream.Current.Open is not { } open)
                throw ErrnoException.Invalid("the first request on a DMA stream must be open{handle}");
            handle = broker.Vfio.FindHandle(session, open.Handle);
        }
        catch (OperationCanceledException) when (session.Ending.IsCancellationRequested && !context.CancellationToken.IsCancellationRequested)
        {
            throw ErrnoException.Unauthenticated($"session {session.Id} ended: {session.EndMessage}");
        }

        // A surprise removal of the device (SPEC §14) ends the stream with ENODEV. Requests keep
        // completing (each with ENODEV) until the client closes its side, which it should at the
        // first of them, or a grace has passed: a stream ended while the client still sends is reset
        // by HTTP/2, and a reset loses the status on the way.
        using var removedGrace = new CancellationTokenSource(Timeout.InfiniteTimeSpan, time);
        using var onRemoved = handle.Removed.Register(static s => ((Action)s!)(), (Action)(() => removedGrace.CancelAfter(broker.Sessions.Options.EndingWriteGrace)));
        using var live = CancellationTokenSource.CreateLinkedTokenSource(ended.Token, removedGrace.Token);
        var outbox = Channel.CreateBounded<Outgoing>(new BoundedChannelOptions(OutboxCapacity)
        {
            SingleReader = true,
            SingleWriter = false,
            FullMode = BoundedChannelFullMode.Wait,
        });
        Action<uint> onInterrupt = vector => outbox.Writer.TryWrite(new Outgoing(
            new Wire.DmaResponse { Interrupt = new Wire.DmaInterrupt { Vector = vector } }, null));
        handle.SetInterruptListener(onInterrupt);
        // Once the session ends nobody awaits these completions: the writer stops too.
        var writer = WriteAllAsync(outbox.Reader, responseStream, live.Token);
        var sessionEnded = false;
        try
        {
            while (await requestStream.MoveNext(live.Token))
            {
                var request = requestStream.Current;
                if (request.OpCase == Wire.DmaRequest.OpOneofCase.Batch && request.Batch.Coalesce)
                {
                    await outbox.Writer.WriteAsync(ExecuteCoalesced(handle, request), live.Token);
                }
                else if (request.OpCase == Wire.DmaRequest.OpOneofCase.Batch)
                {
                    foreach (var inner in request.Batch.Requests)
                        await outbox.Writer.WriteAsync(Execute(handle, inner), live.Token);
                }
                else
                {
                    await outbox.Writer.WriteAsync(Execute(handle, request), live.Token);
                }
            }
        }
        catch (OperationCanceledException) when ((session.Ending.IsCancellationRequested || removedGrace.IsCancellationRequested)
            && !context.CancellationToken.IsCancellationRequested)
        {
            sessionEnded = true;
        }
        finally
        {
            handle.ClearInterruptListener(onInterrupt);
            outbox.Writer.TryComplete();
            await writer;
        }
        if (handle.Removed.IsCancellationRequested && !session.Ending.IsCancellationRequested)
            throw ErrnoException.NoDevice(handle.Device.Address);
        if (!sessionEnded)
            return;
        if (session.ConnectionCut)
        {
            // LINK_DOWN (SPEC §14): reset, as a dead link shows the stream.
            context.GetHttpContext().Abort();
            return;
        }
        throw ErrnoException.Unauthenticated($"session {session.Id} ended: {session.EndMessage}");
    }

    /// <summary>Runs one request on the device and describes the outcome; never throws for a bad request.</summary>
    internal static Outgoing Execute(DeviceHandle handle, Wire.DmaRequest request)
    {
        var completion = Complete(handle, request, out var rented);
        return new Outgoing(new Wire.DmaResponse { Completion = completion }, rented);
    }

    /// <summary>
    /// Runs a coalesced batch's requests in order, each exactly as <see cref="Execute"/> would, and
    /// answers them all in one batch_completion carrying the batch's tag.
    /// </summary>
    internal static Outgoing ExecuteCoalesced(DeviceHandle handle, Wire.DmaRequest batch)
    {
        var coalesced = new Wire.DmaBatchCompletion { Tag = batch.Tag };
        List<byte[]>? rented = null;
        foreach (var inner in batch.Batch.Requests)
        {
            coalesced.Results.Add(Complete(handle, inner, out var buffer));
            if (buffer is not null)
                (rented ??= []).Add(buffer);
        }
        return new Outgoing(new Wire.DmaResponse { BatchCompletion = coalesced }, null, rented);
    }

    // The completion of one request; a read's data borrows `rented`, which goes back to the pool
    // once the completion is on the wire.
    private static Wire.DmaCompletion Complete(DeviceHandle handle, Wire.DmaRequest request, out byte[]? rented)
    {
        var completion = new Wire.DmaCompletion { Tag = request.Tag, Ok = true };
        rented = null;
        try
        {
            switch (request.OpCase)
            {
                case Wire.DmaRequest.OpOneofCase.Write:
                    Apply(completion, handle.DmaWrite(request.Write.Iova, request.Write.Data.Span));
                    break;
                case Wire.DmaRequest.OpOneofCase.Read:
                    var length = Length(request.Read.Length);
                    rented = ArrayPool<byte>.Shared.Rent(length);
                    if (Apply(completion, handle.DmaRead(request.Read.Iova, rented.AsSpan(0, length))))
                        completion.Data = UnsafeByteOperations.UnsafeWrap(rented.AsMemory(0, length));
                    break;
                case Wire.DmaRequest.OpOneofCase.Copy:
                    Apply(completion, handle.DmaCopy(request.Copy.SrcIova, request.Copy.DstIova, Length(request.Copy.Length)));
                    break;
                case Wire.DmaRequest.OpOneofCase.MmioWrite:
                    var w = request.MmioWrite;
                    var result = handle.MmioWrite(w.Index, w.Offset, w.Width, w.Value);
                    if (result.Error is { } error)
                        Fail(completion, Errno.EIO, error);
                    else
                        Apply(completion, result.Dma);
                    break;
                case Wire.DmaRequest.OpOneofCase.MmioRead:
                    var r = request.MmioRead;
                    completion.Value = handle.MmioRead(r.Index, r.Offset, r.Width);
                    break;
                case Wire.DmaRequest.OpOneofCase.Open:
                    Fail(completion, Errno.EINVAL, "this stream is already open on a device handle");
                    break;
                case Wire.DmaRequest.OpOneofCase.Batch:
                    Fail(completion, Errno.EINVAL, "a batch may not contain a batch");
                    break;
                default:
                    Fail(completion, Errno.EINVAL, "the request names no operation");
                    break;
            }
        }
        catch (ErrnoException e)
        {
            Fail(completion, e.Errno, e.Message);
        }
        if (!completion.Ok && rented is not null)
        {
            ArrayPool<byte>.Shared.Return(rented);
            rented = null;
        }
        return completion;
    }

    // The stream's only writer; returns pooled buffers once their bytes are on the wire.
    private static async Task WriteAllAsync(ChannelReader<Outgoing> outbox, IServerStreamWriter<Wire.DmaResponse> stream, CancellationToken callAborted)
    {
        try
        {
            while (await outbox.WaitToReadAsync(callAborted))
            {
                while (outbox.TryRead(out var outgoing))
                {
                    try
                    {
                        await stream.WriteAsync(outgoing.Response, callAborted);
                    }
                    finally
                    {
                        outgoing.Release();
                    }
                }
            }
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or InvalidOperationException or RpcException)
        {
            // The client went away; what is left in the outbox is dropped below.
        }
        while (outbox.TryRead(out var left))
            left.Release();
    }

    private static bool Apply(Wire.DmaCompletion completion, DmaOutcome outcome)
    {
        if (outcome.Ok)
            return true;
        completion.Ok = false;
        completion.Fault = new Wire.DmaFault
        {
            Iova = outcome.FaultIova,
            Access = outcome.Access == DmaAccess.Write ? Wire.Access.Write : Wire.Access.Read,
            Reason = (Wire.FaultReason)(int)outcome.Reason,
        };
        return false;
    }

    private static void Fail(Wire.DmaCompletion completion, Errno errno, string message)
    {
        completion.Ok = false;
        completion.Error = new Wire.DmaError { Reason = errno.ToString(), Message = message };
    }

    private static int Length(uint length) =>
        length <= DeviceHandle.MaxTransfer ? (int)length : throw ErrnoException.Invalid($"a device access moves at most {DeviceHandle.MaxTransfer} bytes, not {length}");

    /// <summary>A response on its way out, with the pooled buffers its data borrows (a coalesced batch's reads may borrow several).</summary>
    internal readonly record struct Outgoing(Wire.DmaResponse Response, byte[]? Rented, List<byte[]>? MoreRented = null)
    {
        public void Release()
        {
            if (Rented is not null)
                ArrayPool<byte>.Shared.Return(Rented);
            if (MoreRented is not null)
            {
                foreach (var buffer in MoreRented)
                    ArrayPool<byte>.Shared.Return(buffer);
            }
        }
    }
}
