using DmaBroker.Core;
using DmaBroker.Server.Hosting;
using Google.Protobuf;
using Grpc.Core;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Services;

/// <summary>The user side of VFIO: each call authenticates its session and hands over to the core.</summary>
public sealed class VfioService(Broker broker, TimeProvider time) : Wire.Vfio.VfioBase
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

    public override Task<Wire.IommuInfo> GetIommuInfo(Wire.GetIommuInfoRequest request, ServerCallContext context)
    {
        var info = broker.Vfio.GetIommuInfo(broker.Authenticate(context), request.ContainerId);
        var response = new Wire.IommuInfo { PageSizes = info.PageSizes, DmaAvail = (uint)info.DmaAvailable };
        response.IovaRanges.AddRange(info.IovaRanges.Select(r => new Wire.IovaRange { Start = r.First, End = r.Last }));
        return Task.FromResult(response);
    }

    public override Task<Wire.MapDmaResponse> MapDma(Wire.MapDmaRequest request, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        var iova = broker.Vfio.MapDma(session, request.ContainerId, request.Vaddr, request.HasIova ? request.Iova : null,
            request.Size, request.Read, request.Write);
        return Task.FromResult(new Wire.MapDmaResponse { Iova = iova });
    }

    public override Task<Wire.UnmapDmaResponse> UnmapDma(Wire.UnmapDmaRequest request, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        var unmapped = broker.Vfio.UnmapDma(session, request.ContainerId, request.Iova, request.Size, request.All);
        return Task.FromResult(new Wire.UnmapDmaResponse { Unmapped = unmapped });
    }

    public override Task<Wire.OpenDeviceResponse> OpenDevice(Wire.OpenDeviceRequest request, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        var handle = broker.Vfio.OpenDevice(session, PciAddress.Parse(request.Address));
        return Task.FromResult(new Wire.OpenDeviceResponse { Handle = handle.Id });
    }

    public override Task<Wire.CloseDeviceResponse> CloseDevice(Wire.CloseDeviceRequest request, ServerCallContext context)
    {
        broker.Vfio.CloseDevice(broker.Authenticate(context), request.Handle);
        return Task.FromResult(new Wire.CloseDeviceResponse());
    }

    public override async Task<Wire.ResetDeviceResponse> ResetDevice(Wire.ResetDeviceRequest request, ServerCallContext context)
    {
        // A SLOW_RESET fault makes the reset take a while: the call answers once it has passed.
        var takes = broker.Vfio.ResetDevice(broker.Authenticate(context), request.Handle);
        if (takes > TimeSpan.Zero)
            await Task.Delay(takes, time, context.CancellationToken);
        return new Wire.ResetDeviceResponse();
    }

    public override Task<Wire.RegionReadResponse> RegionRead(Wire.RegionReadRequest request, ServerCallContext context)
    {
        var data = broker.Vfio.RegionRead(broker.Authenticate(context), request.Handle, request.Index, request.Offset, request.Size);
        return Task.FromResult(new Wire.RegionReadResponse { Data = UnsafeByteOperations.UnsafeWrap(data) });
    }

    public override async Task<Wire.RegionWriteResponse> RegionWrite(Wire.RegionWriteRequest request, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        // A doorbell runs the device's commands, transfers and all: on the device engines, which
        // yield the CPU to control calls (an UnmapDma while devices run flat out). Any other
        // register write is quick and runs here.
        if (broker.Vfio.RegionWriteStartsWork(session, request.Handle, request.Index, request.Offset))
            await broker.Engines.RunAsync(() => broker.Vfio.RegionWrite(session, request.Handle, request.Index, request.Offset, request.Data.Span));
        else
            broker.Vfio.RegionWrite(session, request.Handle, request.Index, request.Offset, request.Data.Span);
        return new Wire.RegionWriteResponse();
    }
}
