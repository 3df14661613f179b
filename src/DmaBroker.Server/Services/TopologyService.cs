using DmaBroker.Core;
using DmaBroker.Server.Hosting;
using Grpc.Core;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Services;

/// <summary>The read side: immutable snapshots, and Watch as ListAndWatch.</summary>
public sealed class TopologyService(Broker broker, IHostApplicationLifetime lifetime) : Wire.Topology.TopologyBase
{
    public override Task<Wire.ListDevicesResponse> ListDevices(Wire.ListDevicesRequest request, ServerCallContext context)
    {
        var snapshot = broker.Journal.Current;
        var response = new Wire.ListDevicesResponse { Revision = snapshot.Revision };
        response.Devices.AddRange(snapshot.Devices.Values.Select(WireMapping.ToProto));
        return Task.FromResult(response);
    }

    public override Task<Wire.ListGroupsResponse> ListGroups(Wire.ListGroupsRequest request, ServerCallContext context)
    {
        var snapshot = broker.Journal.Current;
        var response = new Wire.ListGroupsResponse { Revision = snapshot.Revision };
        response.Groups.AddRange(snapshot.Groups.Values.Select(WireMapping.ToProto));
        return Task.FromResult(response);
    }

    public override Task<Wire.Group> GetGroup(Wire.GetGroupRequest request, ServerCallContext context) =>
        Task.FromResult(broker.Journal.Current.Groups.TryGetValue(request.GroupId, out var group)
            ? group.ToProto()
            : throw ErrnoException.NoGroup(request.GroupId));

    public override async Task Watch(Wire.WatchRequest request, IServerStreamWriter<Wire.WatchEvent> responseStream, ServerCallContext context)
    {
        using var watcher = broker.Journal.Watch();
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken, lifetime.ApplicationStopping);
        try
        {
            // This loop is the stream's only writer.
            await foreach (var ev in watcher.ReadAllAsync(stop.Token))
                await responseStream.WriteAsync(ev.ToProto(), stop.Token);
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
            // The watcher left, or the broker is stopping: end the stream quietly.
        }
    }
}
