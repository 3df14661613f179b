using DmaBroker.Client;
using DmaBroker.Protocol;

namespace DmaBroker.Server.Tests;

/// <summary>
/// Core keeps its own domain constants, because it knows nothing of the wire; these tests hold them
/// equal to the wire's, so the two can never drift apart.
/// </summary>
public sealed class WireConstantsTests
{
    [Fact]
    public void CoreDomainConstants_EqualWireConstants()
    {
        Assert.Equal(WireConstants.PageSize, Core.Iommu.IovaSpace.PageSize);
        Assert.Equal(WireConstants.PageSize, Core.Memory.SessionMemory.PageSize);
        Assert.Equal(WireConstants.ConfigRegion, (uint)Core.Devices.DeviceModel.ConfigIndex);
        Assert.Equal(WireConstants.PciCommandMemorySpace, Core.Devices.DeviceModel.CommandMemory);
        Assert.Equal(WireConstants.PciCommandBusMaster, Core.Devices.DeviceModel.CommandBusMaster);
    }

    [Fact]
    public void CoreErrnos_AreClientErrnosWithTheSameNumbers()
    {
        var client = Enum.GetValues<Errno>().Select(e => (e.ToString(), (int)e)).ToHashSet();
        var core = Enum.GetValues<Core.Errno>().Select(e => (e.ToString(), (int)e)).ToHashSet();

        Assert.Subset(client, core);
    }
}
