using System.Threading.Channels;
using DmaBroker.Protocol;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Grpc.Core.Interceptors;

namespace DmaBroker.Client;

/// <summary>
/// A broker session: the identity (like a Linux <c>struct file *</c>) that owns containers, groups
/// and devices. It keeps its lease alive with pings; disposing it ends the session, and the broker
/// then releases everything it held. If the broker ends it (revoked, lease lost, broker gone),
/// <see cref="Ended"/> completes with the reason.
/// </summary>
public sealed class BrokerSession : IAsyncDisposable
{
    /// <summary>The metadata key that carries the session token on user calls.</summary>
    public const string TokenHeader = WireConstants.SessionTokenHeader;

    private readonly AsyncDuplexStreamingCall<SessionRequest, SessionEvent> _call;
    private readonly CancellationTokenSource _stop;
    private readonly CancellationTokenSource _stopPings = new();
    private readonly Channel<SessionEvent> _events = Channel.CreateUnbounded<SessionEvent>(new UnboundedChannelOptions { SingleWriter = true });
    private readonly TaskCompletionSource<string> _ended = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private Task _reader = Task.CompletedTask;
    private Task _pinger = Task.CompletedTask;
    private int _disposed;
    private readonly HashSet<SharedMapping> _mappings = []; // shared buffers still mapped, unmapped on dispose
    private Task? _requestsCompleted;
    private object? _requestsLock;

    private BrokerSession(AsyncDuplexStreamingCall<SessionRequest, SessionEvent> call, CancellationTokenSource stop, Opened opened, CallInvoker invoker, CallInvoker streams)
    {
        _call = call;
        _stop = stop;
        Id = opened.SessionId;
        Token = opened.Token;
        LeaseTtl = TimeSpan.FromMilliseconds(opened.LeaseTtlMs);
        Principal = opened.Principal;
        Raw = new RawSessionClients(Authenticated(invoker), Authenticated(streams));
    }

    // Every call of the session carries its token.
    private CallInvoker Authenticated(CallInvoker invoker) => invoker.Intercept(metadata =>
    {
        metadata.Add(TokenHeader, Token);
        return metadata;
    });

    /// <summary>The public session id, shown as a group's owner.</summary>
    public ulong Id { get; }

    /// <summary>
    /// Who the session belongs to, as the broker named the caller: <c>cert:&lt;CN&gt;</c>,
    /// <c>token:&lt;name&gt;</c>, <c>uid:&lt;n&gt;</c> or <c>anonymous</c>.
    /// </summary>
    public string Principal { get; }

    /// <summary>The secret token; every call of this session already sends it.</summary>
    public string Token { get; }

    /// <summary>The broker ends the session if it hears nothing for this long; pings go out at a third of it.</summary>
    public TimeSpan LeaseTtl { get; }

    /// <summary>The generated Vfio, Memory and Dma clients, authenticated as this session, for experts; see <see cref="RawSessionClients"/>.</summary>
    public RawSessionClients Raw { get; }

    /// <summary>
    /// Faults, interrupts, <c>device_removed</c> (a device the session held was surprise-removed) and
    /// <c>revoked</c>; completes when the session ends.
    /// </summary>
    public ChannelReader<SessionEvent> Events => _events.Reader;

    /// <summary>Completes with the reason when the session ends, for whatever cause.</summary>
    public Task<string> Ended => _ended.Task;

    internal static async Task<BrokerSession> OpenAsync(BrokerClient client, string? clientName, CancellationToken cancellationToken)
    {
        var stop = new CancellationTokenSource();
        var call = client.Raw.Session.Open(cancellationToken: stop.Token);
        try
        {
            if (!string.IsNullOrEmpty(clientName))
                await call.RequestStream.WriteAsync(new SessionRequest { Hello = new Hello { ClientName = clientName } }, cancellationToken).ConfigureAwait(false);
            if (!await call.ResponseStream.MoveNext(cancellationToken).ConfigureAwait(false) || call.ResponseStream.Current.Opened is not { } opened)
                throw new BrokerException(StatusCode.Internal, "EPROTO", "the broker did not answer Session.Open with 'opened'");
            var session = new BrokerSession(call, stop, opened, client.Invoker, client.StreamInvoker);
            session._reader = session.ReadEventsAsync();
            session._pinger = session.PingAsync();
            return session;
        }
        catch (RpcException e)
        {
            call.Dispose();
            stop.Dispose();
            throw BrokerException.From(e);
        }
        catch
        {
            call.Dispose();
            stop.Dispose();
            throw;
        }
    }

    /// <summary>Runs a Vfio call on behalf of this session, turning broker errors into <see cref="BrokerException"/>.</summary>
    internal Task<T> CallAsync<T>(Func<Vfio.VfioClient, AsyncUnaryCall<T>> call) =>
        BrokerException.Wrap(() => call(Raw.Vfio).ResponseAsync);

    /// <summary>Creates a container (TYPE1V2 or IOMMUFD) and returns its id.</summary>
    public async Task<ulong> CreateContainerAsync(ContainerType type, CancellationToken cancellationToken = default) =>
        (await CallAsync(v => v.CreateContainerAsync(new CreateContainerRequest { Type = type }, cancellationToken: cancellationToken)).ConfigureAwait(false)).ContainerId;

    /// <summary>Creates a container as a typed handle.</summary>
    public async Task<Container> NewContainerAsync(ContainerType type, CancellationToken cancellationToken = default) =>
        new(this, await CreateContainerAsync(type, cancellationToken).ConfigureAwait(false), type);

    /// <summary>Allocates session memory (zeroed, page-aligned).</summary>
    public Task<DmaBuffer> AllocateAsync(ulong size, CancellationToken cancellationToken = default) => AllocateAsync(size, shared: false, cancellationToken);

    /// <summary>
    /// Allocates session memory; with <paramref name="shared"/>, shared memory (SPEC §15): the
    /// broker puts the block in a file under /dev/shm that this process maps, so
    /// <see cref="DmaBuffer.Span"/> and <see cref="DmaBuffer.Memory"/> point straight at the pages
    /// the device DMAs into. Shared memory needs a unix:// broker address (EINVAL otherwise); it is
    /// unmapped here on <see cref="DmaBuffer.FreeAsync"/> and when the session is disposed.
    /// </summary>
    public async Task<DmaBuffer> AllocateAsync(ulong size, bool shared, CancellationToken cancellationToken = default)
    {
        var response = await BrokerException.Wrap(() => Raw.Memory.AllocateAsync(new AllocateRequest { Size = size, Shared = shared }, cancellationToken: cancellationToken).ResponseAsync).ConfigureAwait(false);
        var pages = (size + WireConstants.PageSize - 1) / WireConstants.PageSize * WireConstants.PageSize;
        if (!shared)
            return new DmaBuffer(this, response.Vaddr, pages);
        SharedMapping mapping;
        try
        {
            mapping = SharedMapping.Open(response.ShmPath, response.ShmOffset, pages);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or NotSupportedException)
        {
            // The block is useless unmapped: give it back rather than leak it until the session ends.
            await BrokerException.Wrap(() => Raw.Memory.FreeAsync(new FreeRequest { Vaddr = response.Vaddr }, cancellationToken: cancellationToken).ResponseAsync).ConfigureAwait(false);
            throw new BrokerException(null, nameof(Errno.EACCES), $"cannot map the shared buffer at {response.ShmPath}+0x{response.ShmOffset:x}: {e.Message}", e);
        }
        lock (_mappings)
        {
            if (_disposed != 0)
            {
                ((IDisposable)mapping).Dispose();
                throw new ObjectDisposedException(nameof(BrokerSession));
            }
            _mappings.Add(mapping);
        }
        return new DmaBuffer(this, response.Vaddr, pages, mapping);
    }

    internal void Forget(SharedMapping mapping)
    {
        lock (_mappings)
            _mappings.Remove(mapping);
    }

    /// <summary>VFIO_GROUP_GET_DEVICE_FD: opens a device of a group this session claimed.</summary>
    public async Task<VfioDevice> OpenDeviceAsync(string address, CancellationToken cancellationToken = default)
    {
        var response = await CallAsync(v => v.OpenDeviceAsync(new OpenDeviceRequest { Address = address }, cancellationToken: cancellationToken)).ConfigureAwait(false);
        return new VfioDevice(this, address, response.Handle);
    }

    /// <summary>VFIO_GROUP_SET_CONTAINER: claims the group for this session.</summary>
    public Task SetContainerAsync(uint groupId, ulong containerId, CancellationToken cancellationToken = default) =>
        CallAsync(v => v.SetContainerAsync(new SetContainerRequest { GroupId = groupId, ContainerId = containerId }, cancellationToken: cancellationToken));

    /// <summary>VFIO_GROUP_UNSET_CONTAINER: releases the group.</summary>
    public Task UnsetContainerAsync(uint groupId, CancellationToken cancellationToken = default) =>
        CallAsync(v => v.UnsetContainerAsync(new UnsetContainerRequest { GroupId = groupId }, cancellationToken: cancellationToken));

    /// <summary>iommufd-style device claim into a container.</summary>
    public Task BindDeviceAsync(string address, ulong containerId, CancellationToken cancellationToken = default) =>
        CallAsync(v => v.BindDeviceAsync(new BindDeviceRequest { Address = address, ContainerId = containerId }, cancellationToken: cancellationToken));

    /// <summary>Releases one device claim; the last releases the group.</summary>
    public Task UnbindDeviceAsync(string address, CancellationToken cancellationToken = default) =>
        CallAsync(v => v.UnbindDeviceAsync(new UnbindDeviceRequest { Address = address }, cancellationToken: cancellationToken));

    /// <summary>VFIO_GROUP_GET_STATUS: viable, and whether this session's container is set on it.</summary>
    public Task<GroupStatus> GetGroupStatusAsync(uint groupId, CancellationToken cancellationToken = default) =>
        CallAsync(v => v.GetGroupStatusAsync(new GetGroupStatusRequest { GroupId = groupId }, cancellationToken: cancellationToken));

    private async Task ReadEventsAsync()
    {
        string reason = "closed";
        try
        {
            while (await _call.ResponseStream.MoveNext(CancellationToken.None).ConfigureAwait(false))
            {
                var ev = _call.ResponseStream.Current;
                if (ev.Revoked is { } revoked)
                {
                    reason = revoked.Reason;
                    // Nothing more to say on a revoked session: closing our side lets the broker
                    // complete the call at once (a stopping broker waits for that, up to a grace).
                    _ = CompleteRequestsAsync();
                }
                _events.Writer.TryWrite(ev);
            }
        }
        catch (RpcException e)
        {
            reason = e.StatusCode == StatusCode.Cancelled && _stop.IsCancellationRequested
                ? "closed"
                : $"lost the broker: {e.Status.StatusCode}: {e.Status.Detail}";
        }
        finally
        {
            _events.Writer.TryComplete();
            _ended.TrySetResult(reason);
        }
    }

    // The request stream's only writer after the hello.
    private async Task PingAsync()
    {
        using var timer = new PeriodicTimer(LeaseTtl / 3);
        try
        {
            while (await timer.WaitForNextTickAsync(_stopPings.Token).ConfigureAwait(false) && !_ended.Task.IsCompleted)
                await _call.RequestStream.WriteAsync(new SessionRequest { Ping = new Ping() }, _stopPings.Token).ConfigureAwait(false);
        }
        catch (Exception e) when (e is OperationCanceledException or RpcException or InvalidOperationException or IOException)
        {
            // Stopping, or the stream is gone; the reader reports why.
        }
    }

    /// <summary>
    /// Closes the request stream, once, whoever asks first (the reader on <c>revoked</c>, or
    /// <see cref="DisposeAsync"/>): the pings stop first, as they are its only other writer.
    /// </summary>
    private Task CompleteRequestsAsync() => LazyInitializer.EnsureInitialized(ref _requestsCompleted, ref _requestsLock, async () =>
    {
        try
        {
            await _stopPings.CancelAsync().ConfigureAwait(false);
            await _pinger.ConfigureAwait(false);
            await _call.RequestStream.CompleteAsync().ConfigureAwait(false);
        }
        catch (Exception e) when (e is RpcException or InvalidOperationException or IOException or OperationCanceledException or ObjectDisposedException)
        {
            // The stream is gone already: nothing left to close.
        }
    });

    /// <summary>Ends the session; returns once the broker has released everything it held (or is unreachable).</summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        try
        {
            // A graceful close: the broker tears the session down, then completes the stream.
            using var closeCts = new CancellationTokenSource(TimeSpan.FromSeconds(5));
            await CompleteRequestsAsync().WaitAsync(closeCts.Token).ConfigureAwait(false);
            await _reader.WaitAsync(closeCts.Token).ConfigureAwait(false);
        }
        catch (Exception e) when (e is OperationCanceledException or RpcException or InvalidOperationException or IOException or TimeoutException)
        {
            // The broker is gone or slow; cancelling the call below ends the session on its side too.
        }
        await _stop.CancelAsync().ConfigureAwait(false);
        _call.Dispose();
        await _reader.ConfigureAwait(false);
        _stop.Dispose();
        _stopPings.Dispose();
        // The broker has unlinked the files and stopped all device access to them; now this
        // process lets go of its own mappings (spans taken from them must not be used any more).
        lock (_mappings)
        {
            foreach (var mapping in _mappings)
                ((IDisposable)mapping).Dispose();
            _mappings.Clear();
        }
    }
}
