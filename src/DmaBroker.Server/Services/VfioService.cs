using DmaBroker.Core;
using DmaBroker.Server.Hosting;
using Grpc.Core;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Services;

/// <summary>The user side of VFIO: each call authenticates its session and hands over to the core.</summary>
public sealed class VfioService(Broker broker) : Wire.Vfio.VfioBase
{
    public override Task<Wire.GroupStatus> GetGroupStatus(Wire.GetGroupStatusRequest request, ServerCallContext context)
    {
        var status = broker.Vfio.GetGroupStatus(broker.Authenticate(context), request.GroupId);
        return Task.FromResult(new Wire.GroupStatus { Viable = status.Viable, ContainerSet = status.ContainerSet });
    }

    public override Task<Wire.CreateContainerResponse> CreateContainer(Wire.CreateContainerRequest request, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        var container = broker.Vfio.CreateContainer(session, request.Type.ToCore());
        return Task.FromResult(new Wire.CreateContainerResponse { ContainerId = container.Id });
    }

    public override Task<Wire.DestroyContainerResponse> DestroyContainer(Wire.DestroyContainerRequest request, ServerCallContext context)
    {
        broker.Vfio.DestroyContainer(broker.Authenticate(context), request.ContainerId);
        return Task.FromResult(new Wire.DestroyContainerResponse());
    }

    public override Task<Wire.SetContainerResponse> SetContainer(Wire.SetContainerRequest request, ServerCallContext context)
    {
        broker.Vfio.SetContainer(broker.Authenticate(context), request.GroupId, request.ContainerId);
        return Task.FromResult(new Wire.SetContainerResponse());
    }

    public override Task<Wire.UnsetContainerResponse> UnsetContainer(Wire.UnsetContainerRequest request, ServerCallContext context)
    {
        broker.Vfio.UnsetContainer(broker.Authenticate(context), request.GroupId);
        return Task.FromResult(new Wire.UnsetContainerResponse());
    }

    public override Task<Wire.BindDeviceResponse> BindDevice(Wire.BindDeviceRequest request, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        broker.Vfio.BindDevice(session, PciAddress.Parse(request.Address), request.ContainerId);
        return Task.FromResult(new Wire.BindDeviceResponse());
    }

    public override Task<Wire.UnbindDeviceResponse> UnbindDevice(Wire.UnbindDeviceRequest request, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        broker.Vfio.UnbindDevice(session, PciAddress.Parse(request.Address));
        return Task.FromResult(new Wire.UnbindDeviceResponse());
    }
}
