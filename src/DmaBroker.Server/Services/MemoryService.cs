using DmaBroker.Core.Memory;
using DmaBroker.Server.Hosting;
using Google.Protobuf;
using Grpc.Core;
using Wire = DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Services;

/// <summary>Session memory: the process's own memory, as the CPU sees it.</summary>
public sealed class MemoryService(Core.Broker broker) : Wire.Memory.MemoryBase
{
    public override Task<Wire.AllocateResponse> Allocate(Wire.AllocateRequest request, ServerCallContext context) =>
        Task.FromResult(new Wire.AllocateResponse { Vaddr = broker.Authenticate(context).Allocate(request.Size).Vaddr });

    public override Task<Wire.FreeResponse> Free(Wire.FreeRequest request, ServerCallContext context)
    {
        broker.Authenticate(context).Free(request.Vaddr);
        return Task.FromResult(new Wire.FreeResponse());
    }

    public override Task<Wire.ReadResponse> Read(Wire.ReadRequest request, ServerCallContext context)
    {
        var session = broker.Authenticate(context);
        if (request.Size > SessionMemory.MaxTransfer)
            throw Core.ErrnoException.Invalid($"at most {SessionMemory.MaxTransfer} bytes per read, not {request.Size}");
        var data = new byte[request.Size];
        session.ReadMemory(request.Vaddr, data);
        return Task.FromResult(new Wire.ReadResponse { Data = UnsafeByteOperations.UnsafeWrap(data) });
    }

    public override Task<Wire.WriteResponse> Write(Wire.WriteRequest request, ServerCallContext context)
    {
        broker.Authenticate(context).WriteMemory(request.Vaddr, request.Data.Span);
        return Task.FromResult(new Wire.WriteResponse());
    }
}
