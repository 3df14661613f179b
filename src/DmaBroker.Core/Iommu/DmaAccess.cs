namespace DmaBroker.Core.Iommu;

/// <summary>A device access direction, from the device's point of view.</summary>
public enum DmaAccess
{
    /// <summary>The device reads host memory (outbound, like TX); needs a READ mapping.</summary>
    Read = 1,
    /// <summary>The device writes host memory (inbound, like RX); needs a WRITE mapping.</summary>
    Write = 2,
}

/// <summary>Why a device access faulted.</summary>
public enum FaultReason
{
    /// <summary>A page of the access has no mapping in the attached domain.</summary>
    Unmapped = 1,
    /// <summary>The page is mapped, but without the permission the access needs.</summary>
    Permission = 2,
    /// <summary>The device's command register has Bus Master off, so it may not initiate DMA.</summary>
    BusMasterOff = 3,
    /// <summary>The device's group has no user domain attached (BLOCKING or DEFAULT): all its DMA is blocked.</summary>
    Blocked = 4,
}
