using DmaBroker.Core.Devices;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Ownership;

/// <summary>
/// One PCI function. Its identity is fixed; its binding state is guarded by its group's lock. Its
/// model's own timing (an edu DMA) runs on <paramref name="time"/>.
/// </summary>
public sealed class PciDevice(PciFunctionSpec spec, IommuGroup group, TimeProvider time)
{
    /// <summary>The function's address, its identity in every call.</summary>
    public PciAddress Address => Spec.Address;

    /// <summary>What the topology (or the hotplug request) says the function is.</summary>
    public PciFunctionSpec Spec { get; } = spec;

    /// <summary>The IOMMU group the function was placed in when it appeared; it never moves.</summary>
    public IommuGroup Group { get; } = group;

    /// <summary>The simulated hardware behind the function; accessed under its own lock.</summary>
    internal DeviceModel Model { get; } = DeviceModel.Create(spec, time);

    internal string? Driver { get; set; }
    internal bool DriverManagesDma => Driver is not null && Drivers.ManagesDma(Driver);
    /// <summary>The session whose device claim (BindDevice) holds the device.</summary>
    internal Session? BoundBy { get; set; }
    /// <summary>Open device handles (VFIO device fds).</summary>
    internal int OpenHandles { get; set; }
    internal bool Removed { get; set; }
    /// <summary>The bridge above it; it outlives its children (a bridge with devices below cannot be removed).</summary>
    internal PciDevice? Parent { get; init; }

    internal DeviceInfo ToInfo() => new(
        Address, Spec.VendorId, Spec.DeviceId, Spec.ClassCode, Spec.Model, Group.Id, Driver, DriverManagesDma)
    {
        Kind = Spec.Kind,
        Parent = Parent?.Address,
    };
}
