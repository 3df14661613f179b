using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

public sealed class OversizeTests
{
    [Fact]
    public async Task MemoryWrite_MessageOverLimit_ResourceExhaustedWithErrno()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("big");
        var vaddr = (await session.Raw.Memory.AllocateAsync(new AllocateRequest { Size = 4096 })).Vaddr;
        var e = await Expect(Errno.E2BIG, StatusCode.ResourceExhausted,
            () => Call(() => session.Raw.Memory.WriteAsync(new WriteRequest { Vaddr = vaddr, Data = ByteString.CopyFrom(new byte[17 * 1024 * 1024]) }).ResponseAsync));
        Assert.Contains("exceeds", e.Message, StringComparison.Ordinal);
        // The broker keeps serving the session.
        await session.Raw.Memory.WriteAsync(new WriteRequest { Vaddr = vaddr, Data = ByteString.CopyFromUtf8("ok") });
    }
}
