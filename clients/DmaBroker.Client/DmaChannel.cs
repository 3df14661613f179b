using System.Collections.Concurrent;
using System.Threading.Channels;
using DmaBroker.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;

namespace DmaBroker.Client;

/// <summary>How a <see cref="DmaChannel"/> pipelines and batches.</summary>
public sealed record DmaChannelOptions
{
    /// <summary>Requests on the wire at once; more wait, in order, in the channel until completions make room.</summary>
    public int MaxInFlight { get; init; } = 1024;

    /// <summary>The most requests sent together in one batch message.</summary>
    public int MaxBatch { get; init; } = 256;

    /// <summary>Requests carrying more data than this are sent on their own, never batched.</summary>
    public int SmallOperationBytes { get; init; } = 4096;
}

/// <summary>A DMA fault: the device touched an IOVA it may not, and nothing was written.</summary>
public sealed class DmaFaultException(DmaFault fault)
    : Exception($"DMA fault at IOVA 0x{fault.Iova:x}: {fault.Access} {fault.Reason}")
{
    /// <summary>The faulting IOVA (page-aligned), the access and the reason.</summary>
    public DmaFault Fault { get; } = fault;
}

/// <summary>
/// A DMA request the device completed with an error rather than a fault, such as an edu DMA
/// programmed outside the device buffer (EIO) or a malformed request (EINVAL). The stream itself
/// is fine and later requests go on, so there is no gRPC status: <see cref="BrokerException.StatusCode"/>
/// is null, and <see cref="BrokerException.Errno"/> says what went wrong.
/// </summary>
public sealed class DmaRequestException(ulong tag, string reason, string message)
    : BrokerException(null, reason, message)
{
    /// <summary>The tag of the request that failed.</summary>
    public ulong Tag { get; } = tag;
}

/// <summary>The completion of one DMA request.</summary>
public sealed record DmaResult(ulong Tag, bool Ok, ReadOnlyMemory<byte> Data, ulong Value, DmaFault? Fault, DmaError? Error)
{
    /// <summary>
    /// Returns this result if the request succeeded; otherwise throws <see cref="DmaFaultException"/>
    /// for an IOMMU fault, or <see cref="DmaRequestException"/> with the device's errno for an error.
    /// </summary>
    public DmaResult EnsureOk()
    {
        if (Ok)
            return this;
        if (Fault is { } fault)
            throw new DmaFaultException(fault);
        throw new DmaRequestException(Tag, Error?.Reason ?? nameof(Errno.EIO), Error?.Message ?? "DMA request failed");
    }

    internal static DmaResult From(DmaCompletion c) =>
        new(c.Tag, c.Ok, c.Data.Memory, c.Value, c.Fault, c.Error);
}

/// <summary>
/// A DMA channel to one open device: requests go to the device in the order they are made,
/// pipelined (up to <see cref="DmaChannelOptions.MaxInFlight"/> on the wire), small ones batched
/// into one message whose completions come back coalesced in one message too (SPEC §15), and each
/// task completes, in that order, with its request's completion. Interrupts arrive on
/// <see cref="Interrupts"/>. If the stream breaks, every pending request fails with the reason.
/// </summary>
public sealed class DmaChannel : IAsyncDisposable
{
    private readonly AsyncDuplexStreamingCall<DmaRequest, DmaResponse> _call;
    private readonly DmaChannelOptions _options;
    private readonly Channel<Pending> _outgoing = Channel.CreateUnbounded<Pending>(new UnboundedChannelOptions { SingleReader = true });
    private readonly ConcurrentQueue<Pending> _awaiting = new();
    private readonly Channel<uint> _interrupts = Channel.CreateUnbounded<uint>(new UnboundedChannelOptions { SingleWriter = true });
    private readonly SemaphoreSlim _window;
    private readonly CancellationTokenSource _stop = new();
    private Task _sender = Task.CompletedTask;
    private Task _receiver = Task.CompletedTask;
    private ulong _nextTag;
    private int _disposed;
    private Exception? _broken;

    private DmaChannel(AsyncDuplexStreamingCall<DmaRequest, DmaResponse> call, DmaChannelOptions options)
    {
        _call = call;
        _options = options;
        _window = new SemaphoreSlim(options.MaxInFlight);
    }

    /// <summary>MSI vectors the device raised.</summary>
    public ChannelReader<uint> Interrupts => _interrupts.Reader;

    internal static async Task<DmaChannel> OpenAsync(BrokerSession session, ulong handle, DmaChannelOptions options, CancellationToken cancellationToken)
    {
        // The stream lives until the channel is disposed; the caller's token bounds only the opening.
        var call = session.Raw.Dma.Stream(cancellationToken: CancellationToken.None);
        try
        {
            await call.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = handle } }, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is RpcException or IOException or InvalidOperationException
            || (e is OperationCanceledException && !cancellationToken.IsCancellationRequested))
        {
            // The broker refused the stream (over quota, a bad session) before the open went out.
            var reason = await EndedStatusAsync(call, e).ConfigureAwait(false);
            call.Dispose();
            throw reason;
        }
        catch
        {
            call.Dispose();
            throw;
        }
        var channel = new DmaChannel(call, options);
        channel._sender = channel.SendAsync();
        channel._receiver = channel.ReceiveAsync();
        return channel;
    }

    // A write failed because the call is over: the broker's status, on the response, says why. A
    // write to a stream the broker has already reset fails with CANCELLED (or is cancelled) before
    // the client has read that status, which has arrived all the same.
    private static async Task<BrokerException> EndedStatusAsync(AsyncDuplexStreamingCall<DmaRequest, DmaResponse> call, Exception writeFailure)
    {
        if (writeFailure is RpcException { StatusCode: not StatusCode.Cancelled } status)
            return BrokerException.From(status);
        try
        {
            while (await call.ResponseStream.MoveNext(CancellationToken.None).ConfigureAwait(false))
            {
                // Nothing is answered before the open: whatever came is not for this caller.
            }
        }
        catch (RpcException e)
        {
            return BrokerException.From(e);
        }
        return writeFailure is RpcException cancelled
            ? BrokerException.From(cancelled)
            : new BrokerException(StatusCode.Cancelled, "ECANCELED", "the DMA stream ended as it opened", writeFailure);
    }

    /// <summary>The device writes <paramref name="data"/> to host memory at <paramref name="iova"/>.</summary>
    public Task<DmaResult> WriteAsync(ulong iova, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default) =>
        SubmitAsync(new DmaRequest { Write = new DmaWrite { Iova = iova, Data = ByteString.CopyFrom(data.Span) } }, data.Length, cancellationToken);

    /// <summary>The device reads <paramref name="length"/> bytes of host memory at <paramref name="iova"/>.</summary>
    public Task<DmaResult> ReadAsync(ulong iova, int length, CancellationToken cancellationToken = default) =>
        SubmitAsync(new DmaRequest { Read = new DmaRead { Iova = iova, Length = (uint)length } }, length, cancellationToken);

    /// <summary>The device's copy engine.</summary>
    public Task<DmaResult> CopyAsync(ulong sourceIova, ulong destinationIova, int length, CancellationToken cancellationToken = default) =>
        SubmitAsync(new DmaRequest { Copy = new DmaCopy { SrcIova = sourceIova, DstIova = destinationIova, Length = (uint)length } }, 0, cancellationToken);

    /// <summary>A register write (region 0-5 BAR, 7 config); the completion carries any DMA it started.</summary>
    public Task<DmaResult> MmioWriteAsync(uint region, ulong offset, ulong value, int width = 4, CancellationToken cancellationToken = default) =>
        SubmitAsync(new DmaRequest { MmioWrite = new MmioWrite { Index = region, Offset = offset, Width = (uint)width, Value = value } }, 0, cancellationToken);

    /// <summary>A register read; the value is in <see cref="DmaResult.Value"/>.</summary>
    public Task<DmaResult> MmioReadAsync(uint region, ulong offset, int width = 4, CancellationToken cancellationToken = default) =>
        SubmitAsync(new DmaRequest { MmioRead = new MmioRead { Index = region, Offset = offset, Width = (uint)width } }, 0, cancellationToken);

    private Task<DmaResult> SubmitAsync(DmaRequest request, int payload, CancellationToken cancellationToken)
    {
        cancellationToken.ThrowIfCancellationRequested();
        var pending = new Pending(request, payload > _options.SmallOperationBytes);
        // Tags and queue order follow call order, so the device sees requests in the order they were made.
        lock (_outgoing)
        {
            if (Volatile.Read(ref _broken) is { } broken)
                return Task.FromException<DmaResult>(broken);
            request.Tag = ++_nextTag;
            if (!_outgoing.Writer.TryWrite(pending))
                return Task.FromException<DmaResult>(Volatile.Read(ref _broken) ?? new ObjectDisposedException(nameof(DmaChannel)));
        }
        return pending.Result.Task;
    }

    // The request stream's only writer: whatever is queued goes out, small requests as one batch.
    private async Task SendAsync()
    {
        var batch = new List<Pending>(_options.MaxBatch);
        Pending? current = null;
        try
        {
            while (await _outgoing.Reader.WaitToReadAsync(_stop.Token).ConfigureAwait(false))
            {
                while (batch.Count < _options.MaxBatch && _outgoing.Reader.TryRead(out var p))
                {
                    current = p;
                    // At most MaxInFlight requests on the wire: wait for completions to make room.
                    if (!_window.Wait(0))
                    {
                        await FlushAsync(batch).ConfigureAwait(false);
                        await _window.WaitAsync(_stop.Token).ConfigureAwait(false);
                    }
                    if (p.Large)
                    {
                        await FlushAsync(batch).ConfigureAwait(false);
                        await FlushAsync([p]).ConfigureAwait(false);
                        current = null;
                        continue;
                    }
                    batch.Add(p);
                    current = null;
                }
                await FlushAsync(batch).ConfigureAwait(false);
            }
            await _call.RequestStream.CompleteAsync().ConfigureAwait(false);
        }
        catch (Exception e) when (e is RpcException or OperationCanceledException or InvalidOperationException or IOException)
        {
            if (!_stop.IsCancellationRequested && e is not RpcException { StatusCode: not StatusCode.Cancelled })
            {
                // The call is over while we were writing: the receiver learns the broker's status
                // (ENODEV for a surprise-removed device, UNAUTHENTICATED for an ended session,
                // ENOSPC for a stream refused as it started) and breaks with it. A write to a stream
                // the broker has reset fails with CANCELLED, or is cancelled, before that status has
                // been read: only a failure that carries another status is the call's own.
                await _receiver.ConfigureAwait(false);
            }
            Break(e is RpcException rpc ? BrokerException.From(rpc) : new BrokerException(StatusCode.Cancelled, "ECANCELED", "the DMA channel was closed", e));
            // Requests taken off the queue but not yet awaiting a completion fail with the same reason.
            var broken = Volatile.Read(ref _broken)!;
            current?.Result.TrySetException(broken);
            foreach (var p in batch)
                p.Result.TrySetException(broken);
        }
    }

    private async Task FlushAsync(List<Pending> batch)
    {
        if (batch.Count == 0)
            return;
        if (Volatile.Read(ref _broken) is { } broken)
        {
            foreach (var p in batch)
                p.Result.TrySetException(broken);
            batch.Clear();
            return;
        }
        foreach (var p in batch)
            _awaiting.Enqueue(p);
        DmaRequest message;
        if (batch.Count == 1)
        {
            message = batch[0].Request;
        }
        else
        {
            // One batch_completion answers the whole batch, so small requests are not bound by the
            // message rate; a broker that predates coalescing answers each request on its own,
            // which the receiver takes just as well.
            var b = new DmaBatch { Coalesce = true };
            foreach (var p in batch)
                b.Requests.Add(p.Request);
            message = new DmaRequest { Batch = b };
            lock (_outgoing)
                message.Tag = ++_nextTag;
        }
        batch.Clear();
        await _call.RequestStream.WriteAsync(message, _stop.Token).ConfigureAwait(false);
    }

    private async Task ReceiveAsync()
    {
        try
        {
            while (await _call.ResponseStream.MoveNext(CancellationToken.None).ConfigureAwait(false))
            {
                var response = _call.ResponseStream.Current;
                if (response.Interrupt is { } interrupt)
                {
                    _interrupts.Writer.TryWrite(interrupt.Vector);
                    continue;
                }
                if (response.BatchCompletion is { } coalesced)
                {
                    var answered = 0;
                    foreach (var completion in coalesced.Results)
                    {
                        if (Complete(completion))
                            answered++;
                    }
                    if (answered > 0)
                        _window.Release(answered);
                    continue;
                }
                if (Complete(response.Completion))
                    _window.Release();
            }
            Break(new BrokerException(StatusCode.Cancelled, "ECANCELED", "the DMA channel was closed"));
        }
        catch (RpcException e)
        {
            Break(BrokerException.From(e));
        }
        catch (Exception e)
        {
            // A response this client cannot place breaks the channel rather than leaving callers waiting.
            Break(new BrokerException(StatusCode.Internal, "EPROTO", e.Message, e));
        }
        finally
        {
            _interrupts.Writer.TryComplete();
        }
    }

    // Hands one completion to the caller waiting for it, the oldest; false when none is left to take it.
    private bool Complete(DmaCompletion completion)
    {
        if (!_awaiting.TryDequeue(out var pending))
        {
            // Broken already (the device is gone): what the broker still completes has no caller left.
            if (Volatile.Read(ref _broken) is not null)
                return false;
            throw new InvalidOperationException($"completion for tag {completion.Tag} arrived, but none is outstanding");
        }
        if (pending.Request.Tag != completion.Tag)
            throw new InvalidOperationException($"completion for tag {completion.Tag} arrived out of order");
        pending.Result.TrySetResult(DmaResult.From(completion));
        // The device was surprise-removed (SPEC §14): the channel is done. Breaking it closes our
        // side, so the broker ends the stream with its ENODEV rather than resetting a busy one.
        if (completion.Error is { Reason: nameof(Errno.ENODEV) } gone)
            Break(new BrokerException(StatusCode.NotFound, gone.Reason, gone.Message));
        return true;
    }

    private void Break(Exception reason)
    {
        if (Interlocked.CompareExchange(ref _broken, reason, null) is null)
            _window.Release(_options.MaxInFlight); // wake the sender if it waits for room: there is nothing left to send

        _outgoing.Writer.TryComplete();
        var broken = Volatile.Read(ref _broken) ?? reason;
        while (_awaiting.TryDequeue(out var p))
            p.Result.TrySetException(broken);
        while (_outgoing.Reader.TryRead(out var p))
            p.Result.TrySetException(broken);
    }

    /// <summary>Waits for outstanding requests, then closes the stream.</summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        _outgoing.Writer.TryComplete();
        try
        {
            await _sender.WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
            await _receiver.WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            // The broker stopped answering; cancelling the call below fails what is left.
        }
        await _stop.CancelAsync().ConfigureAwait(false);
        _call.Dispose();
        await _receiver.ConfigureAwait(false);
        await _sender.ConfigureAwait(false);
        Break(new ObjectDisposedException(nameof(DmaChannel)));
        _stop.Dispose();
        _window.Dispose();
    }

    private sealed record Pending(DmaRequest Request, bool Large)
    {
        public TaskCompletionSource<DmaResult> Result { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }
}
