using System.Runtime.CompilerServices;
using DmaBroker.Protocol;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Grpc.Net.Client;

namespace DmaBroker.Client;

/// <summary>Connection settings.</summary>
public sealed record BrokerClientOptions
{
    /// <summary>HTTP/2 keepalive ping interval; a broker that stops answering is detected within this plus <see cref="KeepAliveTimeout"/>.</summary>
    public TimeSpan KeepAliveInterval { get; init; } = TimeSpan.FromSeconds(1);

    /// <summary>How long a keepalive ping may go unanswered before the connection counts as lost.</summary>
    public TimeSpan KeepAliveTimeout { get; init; } = TimeSpan.FromSeconds(3);
}

/// <summary>
/// A connection to a broker: the read side (devices, groups, watch), the admin side, and the
/// door to sessions. Thread-safe; share one per process.
/// </summary>
public sealed class BrokerClient : IDisposable
{
    /// <summary>The broker's default address.</summary>
    public const string DefaultAddress = "http://127.0.0.1:50051";

    /// <summary>The environment variable that names the broker for dmactl and the samples.</summary>
    public const string AddressVariable = "DMABROKER_ADDRESS";

    private BrokerClient(GrpcChannel channel)
    {
        Raw = new RawBrokerClients(channel);
        Admin = new BrokerAdmin(Raw.Kernel);
    }

    /// <summary>The admin side: driver binding, hotplug, session revocation, live counts.</summary>
    public BrokerAdmin Admin { get; }

    /// <summary>The generated gRPC clients and the channel underneath, for experts; see <see cref="RawBrokerClients"/>.</summary>
    public RawBrokerClients Raw { get; }

    /// <summary>Connects (lazily) to a broker at <paramref name="address"/> such as http://127.0.0.1:50051.</summary>
    public static BrokerClient Connect(string? address = null, BrokerClientOptions? options = null)
    {
        options ??= new BrokerClientOptions();
        address = string.IsNullOrWhiteSpace(address) ? DefaultAddress : address;
        if (!Uri.TryCreate(address, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https"))
            throw new ArgumentException($"broker address must be a URL such as {DefaultAddress}, got '{address}'", nameof(address));
        var handler = new SocketsHttpHandler
        {
            KeepAlivePingDelay = options.KeepAliveInterval,
            KeepAlivePingTimeout = options.KeepAliveTimeout,
            KeepAlivePingPolicy = HttpKeepAlivePingPolicy.Always,
            EnableMultipleHttp2Connections = true,
            ConnectTimeout = TimeSpan.FromSeconds(5),
        };
        return new BrokerClient(GrpcChannel.ForAddress(uri, new GrpcChannelOptions
        {
            HttpHandler = handler,
            MaxReceiveMessageSize = WireConstants.MaxMessageSize,
        }));
    }

    /// <summary>All devices, in address order.</summary>
    public Task<ListDevicesResponse> ListDevicesAsync(CancellationToken cancellationToken = default) =>
        BrokerException.Wrap(() => Raw.Topology.ListDevicesAsync(new ListDevicesRequest(), cancellationToken: cancellationToken).ResponseAsync);

    /// <summary>All IOMMU groups with their owners, and the revision they were read at.</summary>
    public Task<ListGroupsResponse> ListGroupsAsync(CancellationToken cancellationToken = default) =>
        BrokerException.Wrap(() => Raw.Topology.ListGroupsAsync(new ListGroupsRequest(), cancellationToken: cancellationToken).ResponseAsync);

    /// <summary>One group; ENOENT if there is no such group.</summary>
    public Task<Group> GetGroupAsync(uint groupId, CancellationToken cancellationToken = default) =>
        BrokerException.Wrap(() => Raw.Topology.GetGroupAsync(new GetGroupRequest { GroupId = groupId }, cancellationToken: cancellationToken).ResponseAsync);

    /// <summary>A snapshot, then every change; a fresh snapshot whenever the watcher fell behind.</summary>
    public async IAsyncEnumerable<WatchEvent> WatchAsync([EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        using var call = Raw.Topology.Watch(new WatchRequest(), cancellationToken: cancellationToken);
        var stream = call.ResponseStream;
        while (true)
        {
            bool more;
            try
            {
                more = await stream.MoveNext(cancellationToken).ConfigureAwait(false);
            }
            catch (RpcException e) when (e.StatusCode != StatusCode.Cancelled || !cancellationToken.IsCancellationRequested)
            {
                throw BrokerException.From(e);
            }
            if (!more)
                yield break;
            yield return stream.Current;
        }
    }

    /// <summary>Opens a session: the identity that owns groups, containers and devices until it is disposed.</summary>
    public Task<BrokerSession> OpenSessionAsync(string? clientName = null, CancellationToken cancellationToken = default) =>
        BrokerSession.OpenAsync(this, clientName, cancellationToken);

    /// <summary>Closes the connection.</summary>
    public void Dispose() => Raw.Channel.Dispose();
}
