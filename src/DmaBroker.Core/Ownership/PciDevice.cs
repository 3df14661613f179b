using DmaBroker.Core.Devices;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Ownership;

/// <summary>
/// One PCI function. Its identity is fixed; its binding state is guarded by its group's lock.
/// </summary>
public sealed class PciDevice(PciFunctionSpec spec, IommuGroup group)
{
    public PciAddress Address => Spec.Address;
    public PciFunctionSpec Spec { get; } = spec;
    public IommuGroup Group { get; } = group;

    /// <summary>The simulated hardware behind the function; accessed under its own lock.</summary>
    public DeviceModel Model { get; } = DeviceModel.Create(spec);

    internal string? Driver { get; set; }
    internal bool DriverManagesDma => Driver is not null && Drivers.ManagesDma(Driver);
    /// <summary>The session whose device claim (BindDevice) holds the device.</summary>
    internal Session? BoundBy { get; set; }
    /// <summary>Open device handles (VFIO device fds).</summary>
    internal int OpenHandles { get; set; }
    internal bool Removed { get; set; }

    internal DeviceInfo ToInfo() => new(
        Address, Spec.VendorId, Spec.DeviceId, Spec.ClassCode, Spec.Model, Group.Id, Driver, DriverManagesDma);
}
