using System.Collections.Immutable;

namespace DmaBroker.Core.Topology;

/// <summary>Who holds a group's DMA ownership.</summary>
public enum OwnerKind
{
    /// <summary><c>owner_cnt == 0</c>: free to claim.</summary>
    None,
    /// <summary>Kernel DMA-API drivers are bound; the count says how many.</summary>
    Kernel,
    /// <summary>One session owns it through a group or device claim; the count says how many claims.</summary>
    User,
}

/// <summary>What a group's devices translate through.</summary>
public enum DomainKind
{
    /// <summary>The kernel's DMA API domain: the state of a group no user owns.</summary>
    Default,
    /// <summary>All DMA blocked: a user owns the group but has no container's domain attached.</summary>
    Blocking,
    /// <summary>A container's address space: the session's mappings decide what the devices reach.</summary>
    User,
}

/// <summary>An immutable view of a group at one revision.</summary>
/// <param name="Id">The group's number.</param>
/// <param name="Devices">Its devices, in address order.</param>
/// <param name="OwnerKind">Who holds its DMA ownership.</param>
/// <param name="OwnerCount">The kernel's <c>owner_cnt</c>: bound DMA-API drivers, or a user's claims.</param>
/// <param name="OwnerSession">The owning session's id for a user owner, else 0.</param>
/// <param name="Generation">Increases with every user grant, so a fencing token can tell one owner from the next.</param>
/// <param name="Domain">What its devices translate through.</param>
public sealed record GroupInfo(
    uint Id,
    ImmutableArray<PciAddress> Devices,
    OwnerKind OwnerKind,
    int OwnerCount,
    ulong OwnerSession,
    ulong Generation,
    DomainKind Domain);

/// <summary>An immutable view of a device at one revision.</summary>
/// <param name="Address">Where the device sits.</param>
/// <param name="VendorId">Its PCI vendor id.</param>
/// <param name="DeviceId">Its PCI device id.</param>
/// <param name="ClassCode">Its 24-bit class code.</param>
/// <param name="Model">The simulated hardware behind it.</param>
/// <param name="GroupId">The IOMMU group it is in.</param>
/// <param name="Driver">The bound driver, or null.</param>
/// <param name="DriverManagedDma">Whether that driver sets <c>driver_managed_dma</c> (then it holds no DMA ownership).</param>
public sealed record DeviceInfo(
    PciAddress Address,
    ushort VendorId,
    ushort DeviceId,
    uint ClassCode,
    string Model,
    uint GroupId,
    string? Driver,
    bool DriverManagedDma)
{
    /// <summary>Where it sits in the PCI tree: the host bridge, a root or switch port, or an endpoint.</summary>
    public PciNodeKind Kind { get; init; } = PciNodeKind.Endpoint;

    /// <summary>The bridge whose secondary bus it is on, or null on bus 0: with it, views draw the PCI tree.</summary>
    public PciAddress? Parent { get; init; }
}
