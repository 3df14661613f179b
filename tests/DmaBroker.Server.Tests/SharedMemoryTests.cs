using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>
/// SPEC §15's local fast path through real listeners and the client library: shared session memory
/// over the Unix socket, mapped by the client, refused elsewhere.
/// </summary>
public sealed class SharedMemoryTests
{
    private const ulong Iova = 0x20_0000;
    private const string UserToken = "user-token-1";

    private static readonly string Auth = $$"""
        {
          "principals": [
            { "name": "token:ci", "token_sha256": "{{SecureBroker.Sha256(UserToken)}}", "roles": ["user"] },
            { "name": "uid:*", "roles": ["user"] }
          ]
        }
        """;

    private static readonly string Uid =
        File.ReadLines("/proc/self/status").First(l => l.StartsWith("Uid:", StringComparison.Ordinal)).Split('\t', StringSplitOptions.RemoveEmptyEntries)[1];

    [Fact]
    public async Task AllocateShared_OverTheUnixSocket_ReturnsAFileOfThePeerThatTheBufferMaps()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        await using var session = await broker.ConnectUnix().OpenSessionAsync("local");

        var response = await session.Raw.Memory.AllocateAsync(new AllocateRequest { Size = 5000, Shared = true });
        var buffer = await session.AllocateAsync(4096, shared: true);

        Assert.StartsWith("/dev/shm/dmabroker-", response.ShmPath, StringComparison.Ordinal);
        Assert.Equal(0ul, response.ShmOffset % 4096);
        Assert.Equal($"{Uid} 600", OwnerAndMode(response.ShmPath));
        Assert.True(buffer.IsShared);
        Assert.Equal(4096, buffer.Span.Length);
        Assert.Equal(4096, buffer.Memory.Length);
        Assert.Equal(8192ul + 4096ul, broker.Broker.Sessions.Find(session.Id).Memory.Used);
    }

    [Fact]
    public async Task AllocateShared_OverTcp_InvalidArgumentEinvalNamingUnixAndNothingAllocated()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        await using var session = await broker.Connect(UserToken).OpenSessionAsync("remote");

        var e = await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => session.AllocateAsync(4096, shared: true));

        Assert.Contains("unix://", e.Message, StringComparison.Ordinal);
        var memory = broker.Broker.Sessions.Find(session.Id).Memory;
        Assert.Equal((0ul, 0, null), (memory.Used, memory.BlockCount, memory.SharedPath));
        var plain = await session.AllocateAsync(4096);
        Assert.False(plain.IsShared);
        Assert.Empty(Directory.GetFiles("/dev/shm", $"dmabroker-{Environment.ProcessId}-s{session.Id}-*"));
        var notShared = Assert.Throws<InvalidOperationException>(() => plain.Span.Length);
        Assert.Contains("shared: true", notShared.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task SharedBuffer_DeviceDmaAndCpu_MeetInTheSpanAndReadWriteAsyncWorkOnBothKinds()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        await using var session = await broker.ConnectUnix().OpenSessionAsync("local");
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        await container.SetGroupAsync(17);
        var buffer = await session.AllocateAsync(0x10000, shared: true);
        await container.MapAsync(buffer, Iova);
        var device = await session.OpenDeviceAsync("0000:0b:00.0");
        await device.EnableBusMasterAsync();
        await using var dma = await device.OpenDmaChannelAsync();

        (await dma.WriteAsync(Iova + 0x100, "device wrote"u8.ToArray())).EnsureOk();
        Assert.Equal("device wrote"u8.ToArray(), buffer.Span.Slice(0x100, 12).ToArray());
        Assert.Equal("device wrote"u8.ToArray(), await buffer.ReadAsync(0x100, 12));

        "cpu wrote"u8.CopyTo(buffer.Span[0x2000..]);
        Assert.Equal("cpu wrote"u8.ToArray(), (await dma.ReadAsync(Iova + 0x2000, 9)).EnsureOk().Data.ToArray());
        await buffer.WriteAsync(0x3000, "via WriteAsync"u8.ToArray());
        Assert.Equal("via WriteAsync"u8.ToArray(), (await dma.ReadAsync(Iova + 0x3000, 14)).EnsureOk().Data.ToArray());
        var outside = await Assert.ThrowsAsync<BrokerException>(() => buffer.ReadAsync(0xfff0, 32));
        Assert.Equal(Errno.EFAULT, outside.Errno);
    }

    [Fact]
    public async Task FreeAndSessionEnd_UnmapTheClientAndUnlinkTheFile()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var session = await broker.ConnectUnix().OpenSessionAsync("local");
        var freed = await session.AllocateAsync(4096, shared: true);
        var kept = await session.AllocateAsync(4096, shared: true);
        var path = broker.Broker.Sessions.Find(session.Id).Memory.SharedPath!;
        freed.Span[0] = 1;

        await freed.FreeAsync();
        Assert.Throws<ObjectDisposedException>(() => freed.Span.Length);
        kept.Span[0] = 2;
        Assert.True(File.Exists(path));

        await session.DisposeAsync();
        Assert.False(File.Exists(path));
        Assert.Throws<ObjectDisposedException>(() => kept.Span.Length);
    }

    // stat(1): the owner's uid and the octal mode.
    private static string OwnerAndMode(string path)
    {
        using var stat = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo("stat", ["-c", "%u %a", path]) { RedirectStandardOutput = true })!;
        var owner = stat.StandardOutput.ReadToEnd().Trim();
        stat.WaitForExit();
        return owner;
    }
}
