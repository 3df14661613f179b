using System.Buffers;

namespace DmaBroker.Core;

/// <summary>
/// Driver names and whether they set <c>driver_managed_dma</c>. A driver that manages DMA itself
/// takes no DMA ownership when it binds; every other driver uses the kernel DMA API.
/// </summary>
public static class Drivers
{
    /// <summary>The VFIO driver: binding it is what makes a device openable by a user driver (OpenDevice, BindDevice).</summary>
    public const string VfioPci = "vfio-pci";

    /// <summary>A placeholder driver that only keeps others off the device; it does no DMA.</summary>
    public const string PciStub = "pci-stub";

    /// <summary>The PCIe port driver that bridges are bound to at boot; it does no DMA of its own.</summary>
    public const string PciePort = "pcieport";

    private static readonly SearchValues<char> NameChars =
        SearchValues.Create("abcdefghijklmnopqrstuvwxyz0123456789_-");

    /// <summary>Whether <paramref name="driver"/> sets <c>driver_managed_dma</c>, so binding it takes no DMA ownership (SPEC §1).</summary>
    public static bool ManagesDma(string driver) => driver is VfioPci or PciStub or PciePort;

    /// <summary>Checks a driver name: 1 to 32 of <c>[a-z0-9_-]</c>, as module names are.</summary>
    public static string Validate(string? driver)
    {
        if (string.IsNullOrEmpty(driver) || driver.Length > 32 || driver.AsSpan().ContainsAnyExcept(NameChars))
            throw ErrnoException.Invalid($"bad driver name {ErrnoException.Quote(driver)}: expected 1 to 32 of [a-z0-9_-], for example vfio-pci");
        return driver;
    }
}
