using System.Globalization;
using System.Text.Json;
using DmaBroker.Core;
using DmaBroker.Core.Topology;
using Google.Protobuf;

namespace DmaBroker.Cluster;

/// <summary>
/// A device's driver as etcd holds it, under <c>/dmabroker/drivers/&lt;address&gt;</c>, with no lease:
/// the driver's name, or empty for none. A device with no key has the driver the topology booted it
/// with (every replica starts from the same topology, which the first one records). A transaction
/// compares the key's mod revision with the one the replica last wrote or saw.
/// </summary>
internal static class DriverRecord
{
    public const string Prefix = "/dmabroker/drivers/";

    public static ByteString Key(PciAddress device) => ByteString.CopyFromUtf8(Prefix + device);

    public static PciAddress? DeviceOf(ByteString key) => Parse(key, Prefix);

    public static ByteString Encode(string? driver) => ByteString.CopyFromUtf8(driver ?? "");

    public static string? Decode(ByteString value) => value.IsEmpty ? null : value.ToStringUtf8();

    internal static PciAddress? Parse(ByteString key, string prefix)
    {
        var text = key.ToStringUtf8();
        return text.StartsWith(prefix, StringComparison.Ordinal) && PciAddress.TryParse(text[prefix.Length..], out var address) ? address : null;
    }
}

/// <summary>
/// A hot-plugged device as etcd holds it, under <c>/dmabroker/hotplug/&lt;address&gt;</c>, with no
/// lease: added (with what it is and the group the adding replica placed it in, so every replica
/// places it there) or removed. The latest change of each address, in revision order, replays the
/// cluster's hotplug onto a replica's topology. Every hotplug also puts <see cref="ShapeKey"/>, and
/// compares its mod revision with the last hotplug the replica saw, so two replicas never hotplug
/// on different views (the cluster's hotplug lock).
/// </summary>
/// <param name="Added">Added, or removed.</param>
/// <param name="Group">The group an added device joined.</param>
/// <param name="Spec">What an added device is.</param>
internal sealed record HotplugRecord(bool Added, uint Group, PciFunctionSpec? Spec)
{
    public const string Prefix = "/dmabroker/hotplug/";

    public static readonly ByteString ShapeKey = ByteString.CopyFromUtf8("/dmabroker/shape");

    public static ByteString Key(PciAddress device) => ByteString.CopyFromUtf8(Prefix + device);

    public static PciAddress? DeviceOf(ByteString key) => DriverRecord.Parse(key, Prefix);

    public ByteString Encode() => ByteString.CopyFromUtf8(Spec is not { } s
        ? "{\"added\":false}"
        : JsonSerializer.Serialize(new Wire(true, Group, s.Kind.ToString(), s.VendorId, s.DeviceId, s.ClassCode, s.Model, s.Acs, s.Driver, s.NamespaceMb, s.DmaLatencyUs)));

    /// <summary>The record a value holds, or null for one that is not (written by something else).</summary>
    public static HotplugRecord? Decode(PciAddress address, ByteString value)
    {
        try
        {
            var w = JsonSerializer.Deserialize<Wire>(value.Span);
            if (w is null)
                return null;
            if (!w.Added)
                return new HotplugRecord(false, 0, null);
            var spec = new PciFunctionSpec(address, Enum.Parse<PciNodeKind>(w.Kind ?? ""), w.VendorId, w.DeviceId, w.ClassCode, w.Model ?? "",
                w.Acs, SecondaryBus: null, w.Driver, PinnedGroup: null)
            {
                NamespaceMb = w.NamespaceMb,
                DmaLatencyUs = w.DmaLatencyUs,
            };
            return new HotplugRecord(true, w.Group, spec);
        }
        catch (Exception e) when (e is JsonException or ArgumentException)
        {
            return null;
        }
    }

    public string Describe(PciAddress address) => Added
        ? string.Create(CultureInfo.InvariantCulture, $"{address} was added (group {Group}) on another replica")
        : $"{address} was removed on another replica";

    private sealed record Wire(bool Added, uint Group = 0, string? Kind = null, ushort VendorId = 0, ushort DeviceId = 0, uint ClassCode = 0,
        string? Model = null, bool Acs = false, string? Driver = null, uint NamespaceMb = 0, uint DmaLatencyUs = 0);
}
