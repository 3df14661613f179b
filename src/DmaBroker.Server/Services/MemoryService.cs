using System.Net.Sockets;
using DmaBroker.Core;
using DmaBroker.Server.Hosting;
using Microsoft.AspNetCore.Connections.Features;
using Google.Protobuf;
using Grpc.Core;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Services;

/// <summary>Session memory: the process's own memory, as the CPU sees it.</summary>
public sealed class MemoryService(Core.Broker broker) : Wire.Memory.MemoryBase
{
    public override Task<Wire.AllocateResponse> Allocate(Wire.AllocateRequest request, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        var block = session.Allocate(request.Size, request.Shared ? SharedMemoryPeer(context) : null);
        return Task.FromResult(new Wire.AllocateResponse { Vaddr = block.Vaddr, ShmPath = block.ShmPath ?? "", ShmOffset = block.ShmOffset });
    }

    // Shared memory (SPEC §15) is for a client on this host, which only a Unix socket proves: its
    // peer's uid, from the kernel, is who the file is given to.
    private static uint SharedMemoryPeer(ServerCallContext context) =>
        context.GetHttpContext().Features.Get<IConnectionSocketFeature>()?.Socket is { AddressFamily: AddressFamily.Unix } socket
        && PeerCredentials.Of(socket) is { } peer
            ? peer.Uid
            : throw ErrnoException.Invalid("shared memory is only for clients on the broker's host: connect through a unix:// listener (--listen unix:///path)");

    public override Task<Wire.FreeResponse> Free(Wire.FreeRequest request, ServerCallContext context)
    {
        broker.Authenticate(context).Free(request.Vaddr);
        return Task.FromResult(new Wire.FreeResponse());
    }

    public override Task<Wire.ReadResponse> Read(Wire.ReadRequest request, ServerCallContext context)
    {
        var data = broker.Authenticate(context).ReadMemory(request.Vaddr, request.Size);
        return Task.FromResult(new Wire.ReadResponse { Data = UnsafeByteOperations.UnsafeWrap(data) });
    }

    public override Task<Wire.WriteResponse> Write(Wire.WriteRequest request, ServerCallContext context)
    {
        broker.Authenticate(context).WriteMemory(request.Vaddr, request.Data.Span);
        return Task.FromResult(new Wire.WriteResponse());
    }
}
