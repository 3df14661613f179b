using DmaBroker.Protocol.V1;
using Grpc.Core;
using Grpc.Net.Client;

namespace DmaBroker.Client;

/// <summary>
/// The generated gRPC clients under a <see cref="BrokerClient"/>, for experts who need a call or a
/// field the library does not wrap. They speak the wire contract (protos/dmabroker/v1) directly:
/// errors arrive as <see cref="RpcException"/>, which <see cref="BrokerException.From"/> turns into
/// the library's types. Everything the library offers is also on <see cref="BrokerClient"/> and
/// <see cref="BrokerClient.Admin"/>; prefer those.
/// </summary>
public sealed class RawBrokerClients
{
    internal RawBrokerClients(GrpcChannel channel, CallInvoker invoker)
    {
        Channel = channel;
        Topology = new Topology.TopologyClient(invoker);
        Kernel = new Kernel.KernelClient(invoker);
        Session = new Session.SessionClient(invoker);
    }

    /// <summary>
    /// The gRPC channel every call of this client uses, for clients of other services (health,
    /// reflection). Calls made on it directly carry no bearer token; the clients here do.
    /// </summary>
    public GrpcChannel Channel { get; }

    /// <summary>The Topology service: devices, groups, watch.</summary>
    public Topology.TopologyClient Topology { get; }

    /// <summary>The Kernel service: the admin side.</summary>
    public Kernel.KernelClient Kernel { get; }

    /// <summary>The Session service: <c>Session.Open</c>, the stream whose life is a session's.</summary>
    public Session.SessionClient Session { get; }
}

/// <summary>
/// The generated gRPC clients of the user services, authenticated as one <see cref="BrokerSession"/>
/// (every call carries its token), for experts who need a call or a field the library does not
/// wrap. Errors arrive as <see cref="RpcException"/>; <see cref="BrokerException.From"/> turns them
/// into the library's types. Prefer the session's own methods and handles.
/// </summary>
public sealed class RawSessionClients
{
    internal RawSessionClients(CallInvoker authenticated, CallInvoker streams)
    {
        Vfio = new Vfio.VfioClient(authenticated);
        Memory = new Memory.MemoryClient(authenticated);
        Dma = new Dma.DmaClient(streams);
    }

    /// <summary>The Vfio service: containers, groups, device claims, mappings, device handles and regions.</summary>
    public Vfio.VfioClient Vfio { get; }

    /// <summary>The Memory service: the session's own memory, as the CPU sees it.</summary>
    public Memory.MemoryClient Memory { get; }

    /// <summary>
    /// The Dma service: the stream on which a device performs DMA; over a connection of its own
    /// with <see cref="BrokerClientOptions.DmaStreamsOwnConnection"/>.
    /// </summary>
    public Dma.DmaClient Dma { get; }
}
