using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Server.Tests;

/// <summary>The .NET client library against a real server: typed handles, the DMA channel, broker loss.</summary>
public sealed class ClientLibraryTests
{
    private const ulong Iova = 0x20_0000;

    private static async Task<(BrokerSession Session, Container Container, DmaBuffer Buffer, VfioDevice Device)> ClaimAsync(TestBroker broker, string address = "0000:0b:00.0", uint group = 17)
    {
        var session = await broker.Client.OpenSessionAsync("lib");
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        await container.SetGroupAsync(group);
        var buffer = await session.AllocateAsync(0x10000);
        await container.MapAsync(buffer, Iova);
        var device = await session.OpenDeviceAsync(address);
        await device.EnableBusMasterAsync();
        return (session, container, buffer, device);
    }

    [Fact]
    public async Task DmaChannel_ManySmallPipelinedOps_AllCompleteInOrderAndLand()
    {
        await using var broker = await TestBroker.StartAsync();
        var (session, _, buffer, device) = await ClaimAsync(broker);
        await using var _ = session;
        await using var dma = await device.OpenDmaChannelAsync(new DmaChannelOptions { MaxInFlight = 64, MaxBatch = 16 });

        var writes = Enumerable.Range(0, 1000).Select(i => dma.WriteAsync(Iova + (ulong)(i % 1024) * 64, BitConverter.GetBytes((long)i))).ToArray();
        var results = await Task.WhenAll(writes).WaitAsync(TestBroker.Timeout);

        Assert.All(results, r => Assert.True(r.Ok));
        Assert.Equal(results.Select(r => r.Tag).Order(), results.Select(r => r.Tag));
        var memory = await buffer.ReadAsync(999 * 64, 8);
        Assert.Equal(999L, BitConverter.ToInt64(memory));
    }

    [Fact]
    public async Task DmaChannel_Fault_ResultCarriesFaultAndEnsureOkThrowsTyped()
    {
        await using var broker = await TestBroker.StartAsync();
        var (session, container, _, device) = await ClaimAsync(broker);
        await using var _ = session;
        await using var dma = await device.OpenDmaChannelAsync();
        var result = await dma.ReadAsync(0x7000_0000, 16);

        Assert.False(result.Ok);
        var e = Assert.Throws<DmaFaultException>(() => result.EnsureOk());
        Assert.Equal((0x7000_0000ul, FaultReason.Unmapped), (e.Fault.Iova, e.Fault.Reason));
        var info = await container.GetInfoAsync();
        Assert.Equal(65534u, info.DmaAvail);
        var fault = await session.Events.ReadAsync().AsTask().WaitAsync(TestBroker.Timeout);
        Assert.Equal(0x7000_0000ul, fault.Fault.Iova);
    }

    [Fact]
    public async Task Errors_AreTypedWithErrno()
    {
        await using var broker = await TestBroker.StartAsync();
        var (session, container, buffer, _) = await ClaimAsync(broker);
        await using var _ = session;
        var busy = await Assert.ThrowsAsync<BrokerException>(() => buffer.FreeAsync());
        Assert.Equal("EBUSY", busy.Reason);
        var exists = await Assert.ThrowsAsync<BrokerException>(() => container.MapAsync(buffer, Iova));
        Assert.Equal("EEXIST", exists.Reason);
        Assert.Equal(0x10000ul, await container.UnmapAllAsync());
        await buffer.FreeAsync();
    }

    [Fact]
    public async Task BrokerLost_PendingAndLaterCallsFailAndSessionEndsWithoutHanging()
    {
        var broker = await TestBroker.StartAsync();
        var (session, _, _, device) = await ClaimAsync(broker);
        var dma = await device.OpenDmaChannelAsync();
        Assert.True((await dma.MmioReadAsync(0, 0)).Ok);

        await broker.DisposeAsync();

        var reason = await session.Ended.WaitAsync(TestBroker.Timeout);
        Assert.False(string.IsNullOrEmpty(reason));
        await Assert.ThrowsAsync<BrokerException>(() => dma.MmioReadAsync(0, 0).WaitAsync(TestBroker.Timeout));
        await dma.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout);
        await session.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout);
    }
}
