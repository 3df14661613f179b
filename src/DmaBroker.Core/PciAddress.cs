using System.Diagnostics.CodeAnalysis;
using System.Globalization;

namespace DmaBroker.Core;

/// <summary>A PCI function address, <c>DDDD:BB:DD.F</c>; ordered as lspci orders them.</summary>
/// <param name="Domain">The PCI segment (domain), 16 bits.</param>
/// <param name="Bus">The bus number.</param>
/// <param name="Device">The device (slot) number, 0 to 31.</param>
/// <param name="Function">The function number, 0 to 7.</param>
public readonly record struct PciAddress(ushort Domain, byte Bus, byte Device, byte Function) : IComparable<PciAddress>
{
    private uint Packed => ((uint)Domain << 16) | ((uint)Bus << 8) | ((uint)Device << 3) | Function;

    /// <summary>The slot (domain, bus, device) shared by the functions of one multi-function device.</summary>
    public PciAddress Slot => this with { Function = 0 };

    /// <summary>Orders by domain, bus, device, function, as lspci lists them.</summary>
    public int CompareTo(PciAddress other) => Packed.CompareTo(other.Packed);

    /// <summary>Comes before in lspci order.</summary>
    public static bool operator <(PciAddress left, PciAddress right) => left.CompareTo(right) < 0;

    /// <summary>Comes before in lspci order, or is the same function.</summary>
    public static bool operator <=(PciAddress left, PciAddress right) => left.CompareTo(right) <= 0;

    /// <summary>Comes after in lspci order.</summary>
    public static bool operator >(PciAddress left, PciAddress right) => left.CompareTo(right) > 0;

    /// <summary>Comes after in lspci order, or is the same function.</summary>
    public static bool operator >=(PciAddress left, PciAddress right) => left.CompareTo(right) >= 0;

    /// <summary>The canonical form, <c>DDDD:BB:DD.F</c> in lowercase hex, as the wire and sysfs write it.</summary>
    public override string ToString() =>
        string.Create(CultureInfo.InvariantCulture, $"{Domain:x4}:{Bus:x2}:{Device:x2}.{Function:x1}");

    /// <summary>Parses <c>DDDD:BB:DD.F</c>, or <c>BB:DD.F</c> in domain 0 as lspci prints it; hex digits in either case.</summary>
    public static bool TryParse([NotNullWhen(true)] string? text, out PciAddress address)
    {
        address = default;
        if (text is null)
            return false;
        var span = text.AsSpan();
        ushort domain = 0;
        if (span.Length == 12)
        {
            if (span[4] != ':' || !TryHex(span[..4], out var d))
                return false;
            domain = (ushort)d;
            span = span[5..];
        }
        if (span.Length != 7 || span[2] != ':' || span[5] != '.')
            return false;
        if (!TryHex(span[..2], out var bus) || !TryHex(span[3..5], out var dev) || !TryHex(span[6..], out var fn))
            return false;
        if (dev > 0x1f || fn > 7)
            return false;
        address = new PciAddress(domain, (byte)bus, (byte)dev, (byte)fn);
        return true;
    }

    /// <summary>Parses an address or throws EINVAL naming the expected form.</summary>
    public static PciAddress Parse(string? text) =>
        TryParse(text, out var address)
            ? address
            : throw ErrnoException.Invalid($"malformed PCI address {ErrnoException.Quote(text)}: expected DDDD:BB:DD.F, for example 0000:06:00.0");

    private static bool TryHex(ReadOnlySpan<char> digits, out uint value)
    {
        value = 0;
        foreach (var c in digits)
        {
            if (!char.IsAsciiHexDigit(c))
                return false;
        }
        return uint.TryParse(digits, NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out value);
    }
}
