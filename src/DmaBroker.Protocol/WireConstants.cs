namespace DmaBroker.Protocol;

/// <summary>
/// Names and numbers both ends of the wire must agree on that the .proto files can only state in
/// comments. The server and the client library take them from here, so they live once. Core keeps
/// its own domain constants (it knows nothing of the wire); a server test holds them equal.
/// </summary>
public static class WireConstants
{
    /// <summary>The metadata key that carries the session token on every Vfio, Memory and Dma call (SPEC §5).</summary>
    public const string SessionTokenHeader = "dmabroker-session-token";

    /// <summary>The largest message either side receives: 16 MiB. A larger request fails RESOURCE_EXHAUSTED / E2BIG.</summary>
    public const int MaxMessageSize = 16 * 1024 * 1024;

    /// <summary><c>google.rpc.ErrorInfo.domain</c> of every broker error; its <c>reason</c> is the Linux errno name (SPEC §9).</summary>
    public const string ErrorDomain = "dmabroker";

    /// <summary>The IOMMU page size and the granule of session memory: IOVAs, sizes and vaddrs of mappings are multiples of it.</summary>
    public const ulong PageSize = 4096;

    /// <summary>The VFIO region index of PCI config space (VFIO_PCI_CONFIG_REGION_INDEX); regions 0-5 are BAR0-BAR5.</summary>
    public const uint ConfigRegion = 7;

    /// <summary>The offset of the 16-bit PCI command register in config space.</summary>
    public const ulong PciCommandRegister = 0x04;

    /// <summary>Command register bit 1, Memory Space: the device answers accesses to its memory BARs.</summary>
    public const ushort PciCommandMemorySpace = 1 << 1;

    /// <summary>Command register bit 2, Bus Master: without it the device may not initiate DMA.</summary>
    public const ushort PciCommandBusMaster = 1 << 2;
}
