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
        var data = broker.Authenticate(context).ReadMemory(request.Vaddr, request.Size);
        return Task.FromResult(new Wire.ReadResponse { Data = UnsafeByteOperations.UnsafeWrap(data) });
    }

    public override Task<Wire.WriteResponse> Write(Wire.WriteRequest request, ServerCallContext context)
    {
        broker.Authenticate(context).WriteMemory(request.Vaddr, request.Data.Span);
        return Task.FromResult(new Wire.WriteResponse());
    }
}
