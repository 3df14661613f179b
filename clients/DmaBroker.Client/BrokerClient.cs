using System.Net.Security;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Security.Cryptography.X509Certificates;
using DmaBroker.Protocol;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Grpc.Net.Client;

namespace DmaBroker.Client;

/// <summary>Connection settings.</summary>
public sealed record BrokerClientOptions
{
    /// <summary>HTTP/2 keepalive ping interval; a broker that stops answering is detected within this plus <see cref="KeepAliveTimeout"/>.</summary>
    public TimeSpan KeepAliveInterval { get; init; } = TimeSpan.FromSeconds(1);

    /// <summary>How long a keepalive ping may go unanswered before the connection counts as lost.</summary>
    public TimeSpan KeepAliveTimeout { get; init; } = TimeSpan.FromSeconds(3);

    /// <summary>
    /// A bearer token sent as <c>authorization: Bearer &lt;token&gt;</c> on every call; the broker's
    /// auth file names its principal <c>token:&lt;name&gt;</c> (SPEC §12). Null sends none.
    /// </summary>
    public string? BearerToken { get; init; }

    /// <summary>
    /// CA certificates that may vouch for an <c>https://</c> broker's certificate, instead of the
    /// system's trust store (a test or private CA). Null trusts the system store only.
    /// </summary>
    public X509Certificate2Collection? TrustedAuthorities { get; init; }

    /// <summary>A client certificate (with its private key) for a broker that requires mTLS; its subject CN is the principal <c>cert:&lt;CN&gt;</c>.</summary>
    public X509Certificate2? ClientCertificate { get; init; }

    /// <summary>
    /// Opens sessions' DMA streams (Dma.Stream) on a second HTTP/2 connection of their own, so a
    /// control call such as UnmapDma never queues behind megabytes of DMA data in one connection's
    /// flow-control window and TCP send queue (under four devices streaming 1 MiB writes, UnmapDma's
    /// median falls from about 1.3 ms to 0.15-0.5 ms). The price: the two connections are not
    /// ordered, so a call made after <c>OpenDmaChannelAsync</c> returns may reach the broker before
    /// the stream does (counted in stats, or against the dma_streams quota, a moment later). Off by default.
    /// </summary>
    public bool DmaStreamsOwnConnection { get; init; }
}

/// <summary>
/// A connection to a broker: the read side (devices, groups, watch), the admin side, and the
/// door to sessions. Thread-safe; share one per process. With
/// <see cref="BrokerClientOptions.DmaStreamsOwnConnection"/>, sessions' DMA streams go over a second
/// connection of their own.
/// </summary>
public sealed class BrokerClient : IDisposable
{
    /// <summary>The broker's default address.</summary>
    public const string DefaultAddress = "http://127.0.0.1:50051";

    /// <summary>The environment variable that names the broker for dmactl and the samples.</summary>
    public const string AddressVariable = "DMABROKER_ADDRESS";

    private readonly GrpcChannel? _streams;

    private BrokerClient(GrpcChannel channel, GrpcChannel? streams, BrokerClientOptions options)
    {
        _streams = streams;
        Invoker = WithBearer(channel.CreateCallInvoker(), options);
        StreamInvoker = streams is null ? Invoker : WithBearer(streams.CreateCallInvoker(), options);
        Raw = new RawBrokerClients(channel, Invoker);
        Admin = new BrokerAdmin(Raw.Kernel);
    }

    /// <summary>Every call goes through this: the channel, with the bearer token when there is one.</summary>
    internal CallInvoker Invoker { get; }

    /// <summary>The same for DMA streams: over their own connection, or <see cref="Invoker"/>.</summary>
    internal CallInvoker StreamInvoker { get; }

    /// <summary>The admin side: driver binding, hotplug, session revocation, live counts.</summary>
    public BrokerAdmin Admin { get; }

    /// <summary>The generated gRPC clients and the channel underneath, for experts; see <see cref="RawBrokerClients"/>.</summary>
    public RawBrokerClients Raw { get; }

    /// <summary>
    /// Connects (lazily) to a broker at <paramref name="address"/>: <c>http://host:port</c> (HTTP/2
    /// cleartext), <c>https://host:port</c> (TLS, see <see cref="BrokerClientOptions.TrustedAuthorities"/>
    /// and <see cref="BrokerClientOptions.ClientCertificate"/>), <c>host:port</c> (the same as
    /// <c>http://host:port</c>) or <c>unix:///path</c> (a Unix socket on this host, where the broker
    /// knows the caller by its uid).
    /// </summary>
    public static BrokerClient Connect(string? address = null, BrokerClientOptions? options = null)
    {
        options ??= new BrokerClientOptions();
        address = string.IsNullOrWhiteSpace(address) ? DefaultAddress : address;
        return new BrokerClient(Channel(address, options), options.DmaStreamsOwnConnection ? Channel(address, options) : null, options);
    }

    // One channel, with a connection pool (and so a connection) of its own.
    private static GrpcChannel Channel(string address, BrokerClientOptions options)
    {
        var handler = new SocketsHttpHandler
        {
            KeepAlivePingDelay = options.KeepAliveInterval,
            KeepAlivePingTimeout = options.KeepAliveTimeout,
            KeepAlivePingPolicy = HttpKeepAlivePingPolicy.Always,
            EnableMultipleHttp2Connections = true,
            ConnectTimeout = TimeSpan.FromSeconds(5),
        };
        Uri uri;
        if (address.StartsWith("unix:", StringComparison.OrdinalIgnoreCase))
        {
            var path = address["unix:".Length..];
            path = path.StartsWith("//", StringComparison.Ordinal) ? path[2..] : path;
            if (!path.StartsWith('/'))
                throw new ArgumentException($"a Unix socket address is unix:///absolute/path, got '{address}'", nameof(address));
            var endpoint = new UnixDomainSocketEndPoint(path);
            handler.ConnectCallback = async (_, cancellationToken) =>
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await socket.ConnectAsync(endpoint, cancellationToken).ConfigureAwait(false);
                    return new NetworkStream(socket, ownsSocket: true);
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
            };
            // gRPC needs an http address; the socket above is what it connects to.
            uri = new Uri("http://localhost");
        }
        else if (!Uri.TryCreate(WithScheme(address), UriKind.Absolute, out uri!) || uri.Scheme is not ("http" or "https"))
        {
            throw new ArgumentException($"broker address must be a URL such as {DefaultAddress}, https://host:port, host:port or unix:///path, got '{address}'", nameof(address));
        }
        if (options.ClientCertificate is { } certificate)
            handler.SslOptions.ClientCertificates = [certificate];
        if (options.TrustedAuthorities is { Count: > 0 } authorities)
            handler.SslOptions.RemoteCertificateValidationCallback = (_, presented, _, errors) => Trusts(authorities, presented, errors);
        return GrpcChannel.ForAddress(uri, new GrpcChannelOptions
        {
            HttpHandler = handler,
            MaxReceiveMessageSize = WireConstants.MaxMessageSize,
        });
    }

    private static CallInvoker WithBearer(CallInvoker invoker, BrokerClientOptions options)
    {
        if (options.BearerToken is not { Length: > 0 } token)
            return invoker;
        var authorization = $"Bearer {token}";
        return invoker.Intercept(metadata =>
        {
            metadata.Add("authorization", authorization);
            return metadata;
        });
    }

    // host:port alone, as people type it, means cleartext http like the broker's default listener.
    private static string WithScheme(string address) => address.Contains("://", StringComparison.Ordinal) ? address : $"http://{address}";

    // The system store already vouched, or the given authorities do (name checks still apply).
    private static bool Trusts(X509Certificate2Collection authorities, X509Certificate? presented, SslPolicyErrors errors)
    {
        if (errors == SslPolicyErrors.None)
            return true;
        if (presented is null || (errors & ~SslPolicyErrors.RemoteCertificateChainErrors) != 0)
            return false;
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.AddRange(authorities);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        using var certificate = new X509Certificate2(presented);
        return chain.Build(certificate);
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
    public void Dispose()
    {
        Raw.Channel.Dispose();
        _streams?.Dispose();
    }
}
