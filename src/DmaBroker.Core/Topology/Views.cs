using System.Collections.Immutable;

namespace DmaBroker.Core.Topology;

/// <summary>Who holds a group's DMA ownership.</summary>
public enum OwnerKind
{
    None,
    Kernel,
    User,
}

/// <summary>What a group's devices translate through.</summary>
public enum DomainKind
{
    Default,
    Blocking,
    User,
}

/// <summary>An immutable view of a group at one revision.</summary>
public sealed record GroupInfo(
    uint Id,
    ImmutableArray<PciAddress> Devices,
    OwnerKind OwnerKind,
    int OwnerCount,
    ulong OwnerSession,
    ulong Generation,
    DomainKind Domain);

/// <summary>An immutable view of a device at one revision.</summary>
public sealed record DeviceInfo(
    PciAddress Address,
    ushort VendorId,
    ushort DeviceId,
    uint ClassCode,
    string Model,
    uint GroupId,
    string? Driver,
    bool DriverManagedDma);
