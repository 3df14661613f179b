namespace DmaBroker.Ctl;

/// <summary>
/// The driver names dmactl binds without --force. The broker takes any well-formed name, as sysfs
/// would, so a typo such as <c>vfio_pci</c> would silently bind a DMA-API driver; dmactl catches it.
/// </summary>
internal static class DriverNames
{
    /// <summary>The drivers that set driver_managed_dma and take no DMA ownership (src/DmaBroker.Core/Drivers.cs).</summary>
    public static readonly string[] ManageDma = ["vfio-pci", "pci-stub", "pcieport"];

    /// <summary>The kernel DMA-API drivers SPEC §1 and the default topology name.</summary>
    public static readonly string[] DmaApi = ["nvme", "ixgbe", "snd_hda_intel"];

    public static IEnumerable<string> All => ManageDma.Concat(DmaApi);

    public static string Describe() =>
        $"{string.Join(", ", ManageDma)} (manage DMA themselves), {string.Join(", ", DmaApi)} (kernel DMA API)";
}
