namespace DmaBroker.Core.Iommu;

/// <summary>A device access direction, from the device's point of view.</summary>
public enum DmaAccess
{
    Read = 1,
    Write = 2,
}

/// <summary>Why a device access faulted.</summary>
public enum FaultReason
{
    Unmapped = 1,
    Permission = 2,
    BusMasterOff = 3,
    Blocked = 4,
}
