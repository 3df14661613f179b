using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>
/// Vfio.RegionWrite of an NVMe doorbell runs on the broker's device engines (below the control
/// plane's priority); every other register write runs on the call's own thread; the doorbell's
/// errors reach the client as they always did.
/// </summary>
public sealed class DeviceEnginesServiceTests
{
    private const string Nvme = "0000:01:00.0";
    private const string Edu = "0000:08:00.0";

    [Fact]
    public async Task RegionWrite_NvmeDoorbellOnTheEngines_OtherRegistersNot_ErrorsAsBefore()
    {
        await using var broker = await TestBroker.StartAsync();
        Assert.Equal(Core.BrokerOptions.DefaultDeviceNice, broker.Broker.Options.DeviceNice);
        await broker.Client.Admin.UnbindDriverAsync(Nvme);
        await broker.Client.Admin.BindDriverAsync(Nvme, "vfio-pci");
        await using var session = await broker.Client.OpenSessionAsync("doorbells");
        var container = await session.CreateContainerAsync(ContainerType.Iommufd);
        await session.BindDeviceAsync(Nvme, container);
        await session.BindDeviceAsync(Edu, container);
        var vfio = session.Raw.Vfio;
        var nvme = (await vfio.OpenDeviceAsync(new OpenDeviceRequest { Address = Nvme })).Handle;
        var edu = (await vfio.OpenDeviceAsync(new OpenDeviceRequest { Address = Edu })).Handle;
        var engines = broker.Broker.Engines;
        var zero = ByteString.CopyFrom(new byte[4]);

        // Registers: the edu's liveness check, the NVMe controller's CC (it stays disabled).
        var ran = engines.Ran;
        await vfio.RegionWriteAsync(new RegionWriteRequest { Handle = edu, Index = 0, Offset = 4, Data = ByteString.CopyFrom(1, 2, 3, 4) });
        await vfio.RegionWriteAsync(new RegionWriteRequest { Handle = nvme, Index = 0, Offset = 0x14, Data = zero });
        Assert.Equal(ran, engines.Ran);

        // The admin submission queue's tail doorbell: on the engines, and done when the call returns.
        await vfio.RegionWriteAsync(new RegionWriteRequest { Handle = nvme, Index = 0, Offset = 0x1000, Data = zero });
        Assert.Equal(ran + 1, engines.Ran);

        // A doorbell write of 3 bytes is refused there, as it was on the call's thread.
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => Call(() => vfio.RegionWriteAsync(
            new RegionWriteRequest { Handle = nvme, Index = 0, Offset = 0x1000, Data = ByteString.CopyFrom(0, 0, 0) }).ResponseAsync));
        Assert.Equal(ran + 2, engines.Ran);
    }
}
