using DmaBroker.Core.Devices;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core.Tests;

/// <summary>
/// The checks the server leaves to the core: every integer the wire carries, however wide, is
/// refused here with EINVAL (never an overflow, never an allocation of the size asked for).
/// </summary>
public sealed class WireEdgeTests : IAsyncLifetime
{
    private readonly DmaRig _rig = DmaRig.Create(ContainerType.Type1v2);

    public Task InitializeAsync() => Task.CompletedTask;

    public Task DisposeAsync() => _rig.DisposeAsync().AsTask();

    [Theory]
    [InlineData(0u)]
    [InlineData(3u)]
    [InlineData(5u)]
    [InlineData(16u)]
    [InlineData(1000u)]
    [InlineData(0x8000_0004u)]
    [InlineData(uint.MaxValue)]
    public void MmioAccess_WidthNotOneTwoFourOrEight_FailsEinval(uint width)
    {
        var handle = _rig.Open();

        foreach (uint index in new[] { 0, DeviceModel.ConfigIndex })
        {
            AssertInvalid(() => handle.MmioRead(index, 0, width));
            AssertInvalid(() => handle.MmioWrite(index, 0, width, 0));
        }
    }

    [Theory]
    [InlineData(0u)]
    [InlineData(257u)]
    [InlineData(uint.MaxValue)]
    public void RegionRead_SizeEmptyOrBeyondConfigSpace_FailsEinval(uint size)
    {
        var handle = _rig.Open();

        AssertInvalid(() => _rig.Vfio.RegionRead(_rig.Session, handle.Id, DeviceModel.ConfigIndex, 0, size));
    }

    [Fact]
    public void RegionWrite_EduDmaOutsideItsBuffer_FailsEio()
    {
        var handle = _rig.Open();
        _rig.Vfio.RegionWrite(_rig.Session, handle.Id, 0, EduDevice.RegDmaCount, BitConverter.GetBytes((ulong)EduDevice.DmaSize + 1));

        var e = Assert.Throws<ErrnoException>(() => _rig.Vfio.RegionWrite(_rig.Session, handle.Id, 0, EduDevice.RegDmaCommand,
            BitConverter.GetBytes(EduDevice.DmaCommandStart)));

        Assert.Equal(Errno.EIO, e.Errno);
    }

    [Theory]
    [InlineData(ulong.MaxValue)]
    [InlineData(uint.MaxValue)]
    [InlineData(Memory.SessionMemory.MaxTransfer + 1UL)]
    public void ReadMemory_SizeBeyondOneTransfer_FailsEinvalBeforeAllocating(ulong size)
    {
        var block = _rig.Allocate(DmaRig.Page);

        AssertInvalid(() => _rig.Session.ReadMemory(block.Vaddr, size));
    }

    [Fact]
    public void ReadMemory_Size_ReturnsThatManyBytes()
    {
        var block = _rig.Allocate(DmaRig.Page);
        _rig.Session.WriteMemory(block.Vaddr, [1, 2, 3]);

        Assert.Equal(new byte[] { 1, 2, 3, 0 }, _rig.Session.ReadMemory(block.Vaddr, 4));
    }

    [Theory]
    [InlineData(0x1_0000u, 0x11e8u, 0u)]
    [InlineData(0x1234u, 0x1_0000u, 0u)]
    [InlineData(0x1234u, 0x11e8u, 0x100_0000u)]
    public void HotplugEndpoint_IdWiderThanPci_FailsEinval(uint vendorId, uint deviceId, uint classCode) =>
        AssertInvalid(() => PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:0c:00.0"), vendorId, deviceId, classCode, "edu", acs: true, ""));

    [Fact]
    public void HotplugEndpoint_EmptyDriver_IsAnEndpointWithoutDriver()
    {
        var spec = PciFunctionSpec.HotplugEndpoint(PciAddress.Parse("0000:0c:00.0"), 0x1234, 0x11e8, 0xff0000, "edu", acs: true, "");

        Assert.Equal((PciNodeKind.Endpoint, (ushort)0x1234, (ushort)0x11e8, 0xff0000u, "edu", true, (byte?)null, (string?)null, (uint?)null),
            (spec.Kind, spec.VendorId, spec.DeviceId, spec.ClassCode, spec.Model, spec.Acs, spec.SecondaryBus, spec.Driver, spec.PinnedGroup));
    }

    private static void AssertInvalid(Action call)
    {
        var e = Assert.Throws<ErrnoException>(call);
        Assert.Equal((Errno.EINVAL, ErrorKind.InvalidArgument), (e.Errno, e.Kind));
    }

    private static void AssertInvalid(Func<object> call) => AssertInvalid(() => { call(); });
}
