using DmaBroker.Core;
using DmaBroker.Core.Topology;
using DmaBroker.Server.Hosting;
using Grpc.Core;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Services;

/// <summary>The kernel and operator side: driver binding, hotplug, revocation, counts.</summary>
public sealed class KernelService(Broker broker) : Wire.Kernel.KernelBase
{
    public override Task<Wire.Device> BindDriver(Wire.BindDriverRequest request, ServerCallContext context) =>
        Task.FromResult(broker.Table.BindDriver(PciAddress.Parse(request.Address), request.Driver).ToProto());

    public override Task<Wire.Device> UnbindDriver(Wire.UnbindDriverRequest request, ServerCallContext context) =>
        Task.FromResult(broker.Table.UnbindDriver(PciAddress.Parse(request.Address)).ToProto());

    public override Task<Wire.Device> AddDevice(Wire.AddDeviceRequest request, ServerCallContext context)
    {
        var spec = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse(request.Address), request.VendorId, request.DeviceId,
            request.ClassCode, request.Model, request.Acs, request.Driver);
        return Task.FromResult(broker.Table.AddDevice(spec).ToProto());
    }

    public override Task<Wire.RemoveDeviceResponse> RemoveDevice(Wire.RemoveDeviceRequest request, ServerCallContext context)
    {
        broker.Table.RemoveDevice(PciAddress.Parse(request.Address));
        return Task.FromResult(new Wire.RemoveDeviceResponse());
    }

    public override async Task<Wire.RevokeSessionResponse> RevokeSession(Wire.RevokeSessionRequest request, ServerCallContext context)
    {
        await broker.Sessions.RevokeAsync(request.SessionId, request.Reason, context.Caller().Grant);
        return new Wire.RevokeSessionResponse();
    }

    public override Task<Wire.ListSessionsResponse> ListSessions(Wire.ListSessionsRequest request, ServerCallContext context)
    {
        var response = new Wire.ListSessionsResponse();
        response.Sessions.AddRange(broker.ListSessions(context.Caller().Grant).Select(WireMapping.ToProto));
        return Task.FromResult(response);
    }

    public override async Task<Wire.InjectFaultResponse> InjectFault(Wire.InjectFaultRequest request, ServerCallContext context)
    {
        var fault = await broker.Faults.InjectAsync(PciAddress.Parse(request.Address), request.ToCore());
        return new Wire.InjectFaultResponse { FaultId = fault.Id };
    }

    public override Task<Wire.ClearFaultsResponse> ClearFaults(Wire.ClearFaultsRequest request, ServerCallContext context)
    {
        var cleared = broker.Faults.Clear(request.Address.Length == 0 ? null : PciAddress.Parse(request.Address));
        return Task.FromResult(new Wire.ClearFaultsResponse { Cleared = (uint)cleared });
    }

    public override Task<Wire.ListFaultsResponse> ListFaults(Wire.ListFaultsRequest request, ServerCallContext context)
    {
        var response = new Wire.ListFaultsResponse();
        response.Faults.AddRange(broker.Faults.List().Select(WireMapping.ToProto));
        return Task.FromResult(response);
    }

    public override Task<Wire.BrokerStats> GetStats(Wire.GetStatsRequest request, ServerCallContext context)
    {
        var s = broker.GetStats();
        return Task.FromResult(new Wire.BrokerStats
        {
            Sessions = (uint)s.Sessions,
            Containers = (uint)s.Containers,
            UserOwnedGroups = (uint)s.UserOwnedGroups,
            Watchers = (uint)s.Watchers,
            SessionsOpened = (ulong)s.SessionsOpened,
            SessionsClosed = (ulong)s.SessionsClosed,
            MemoryBytes = s.MemoryBytes,
            OpenDevices = (uint)s.OpenDevices,
            DmaStreams = (uint)s.DmaStreams,
            Mappings = (uint)s.Mappings,
        });
    }
}
