using System.Globalization;
using System.Reflection;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace DmaBroker.Core.Topology;

/// <summary>Where a function sits in the PCI tree; decides how it groups (SPEC §2).</summary>
public enum PciNodeKind
{
    /// <summary>The host bridge on bus 0: a bridge without a secondary bus.</summary>
    HostBridge,
    /// <summary>A PCIe root port, leading to the bus below it.</summary>
    RootPort,
    /// <summary>A switch's upstream port.</summary>
    SwitchUpstream,
    /// <summary>A switch's downstream port: without ACS, it shares a group with its siblings and everything below them.</summary>
    SwitchDownstream,
    /// <summary>A device function, such as an NVMe drive or an edu device.</summary>
    Endpoint,
}

/// <summary>One function as a topology file describes it, validated.</summary>
/// <param name="Address">Where the function sits.</param>
/// <param name="Kind">Bridge or endpoint, which decides how it groups.</param>
/// <param name="VendorId">The PCI vendor id, as config space shows it.</param>
/// <param name="DeviceId">The PCI device id.</param>
/// <param name="ClassCode">The 24-bit class code (class, subclass, programming interface).</param>
/// <param name="Model">The simulated hardware behind it: <c>edu</c>, <c>nvme</c>, <c>nic</c>, <c>gpu</c>, <c>audio</c> or <c>bridge</c>.</param>
/// <param name="Acs">Whether it isolates its traffic (Access Control Services); without it, functions share a group.</param>
/// <param name="SecondaryBus">For a bridge, the bus below it.</param>
/// <param name="Driver">The driver bound at boot, if any.</param>
/// <param name="PinnedGroup">A group id the topology fixes instead of the grouping rules.</param>
public sealed record PciFunctionSpec(
    PciAddress Address,
    PciNodeKind Kind,
    ushort VendorId,
    ushort DeviceId,
    uint ClassCode,
    string Model,
    bool Acs,
    byte? SecondaryBus,
    string? Driver,
    uint? PinnedGroup)
{
    /// <summary>The default size of an <c>nvme</c> function's namespace, in MiB (SPEC §14).</summary>
    public const uint DefaultNamespaceMb = 64;

    /// <summary>The largest namespace a topology may give an <c>nvme</c> function, in MiB (1 TiB; it is stored sparsely).</summary>
    public const uint MaxNamespaceMb = 1024 * 1024;

    /// <summary>
    /// The default time an <c>edu</c> function's DMA takes, in microseconds, from the command that
    /// starts it to the transfer, the start bit clearing and the completion interrupt (docs/edu.md).
    /// </summary>
    public const uint DefaultDmaLatencyUs = 200;

    /// <summary>The longest DMA latency a topology may give an <c>edu</c> function, in microseconds (1 s; QEMU's is 100 ms).</summary>
    public const uint MaxDmaLatencyUs = 1_000_000;

    /// <summary>Anything but an endpoint: bridges can carry buses below them and cannot be hot-added.</summary>
    public bool IsBridge => Kind is not PciNodeKind.Endpoint;

    /// <summary>For an <c>nvme</c> function, the size of its one namespace in MiB (<c>namespaceMb</c> in a topology file).</summary>
    public uint NamespaceMb { get; init; } = DefaultNamespaceMb;

    /// <summary>For an <c>edu</c> function, how long each DMA runs before it completes, in microseconds (<c>dmaLatencyUs</c> in a topology file).</summary>
    public uint DmaLatencyUs { get; init; } = DefaultDmaLatencyUs;

    /// <summary>
    /// An endpoint to hot-add (Kernel.AddDevice), from the wire's wider integers: vendor and
    /// device ids must fit 16 bits and the class code 24 (EINVAL otherwise); an empty driver
    /// name means none. Whether the model can be hot-added is the table's to decide.
    /// </summary>
    public static PciFunctionSpec HotplugEndpoint(PciAddress address, uint vendorId, uint deviceId, uint classCode, string model, bool acs, string? driver)
    {
        if (vendorId > 0xffff || deviceId > 0xffff)
            throw ErrnoException.Invalid("vendor_id and device_id are 16-bit");
        if (classCode > 0xffffff)
            throw ErrnoException.Invalid("class_code is 24-bit");
        return new PciFunctionSpec(address, PciNodeKind.Endpoint, (ushort)vendorId, (ushort)deviceId, classCode, model, acs,
            SecondaryBus: null, string.IsNullOrEmpty(driver) ? null : driver, PinnedGroup: null);
    }
}

/// <summary>A topology: the functions of a PCI tree, in address order.</summary>
public sealed class TopologyDocument
{
    private const string DefaultResourceName = "DmaBroker.Core.default-topology.json";

    /// <summary>A topology of these functions; <see cref="TopologyException"/> if they do not form a valid tree.</summary>
    public TopologyDocument(IEnumerable<PciFunctionSpec> functions)
    {
        Functions = [.. functions.OrderBy(f => f.Address)];
        Validate();
    }

    /// <summary>Every function, bridges included, in address order: the order groups are numbered in.</summary>
    public IReadOnlyList<PciFunctionSpec> Functions { get; }

    /// <summary>The embedded default topology of SPEC §2.</summary>
    public static TopologyDocument Default()
    {
        using var stream = typeof(TopologyDocument).Assembly.GetManifestResourceStream(DefaultResourceName)
            ?? throw new InvalidOperationException($"resource {DefaultResourceName} missing from {Assembly.GetExecutingAssembly().FullName}");
        return Parse(stream, "embedded default topology");
    }

    /// <summary>Reads a topology JSON file (the broker's <c>--topology</c>); <see cref="TopologyException"/> names the file.</summary>
    public static TopologyDocument Load(string path)
    {
        using var stream = File.OpenRead(path);
        return Parse(stream, path);
    }

    /// <summary>Parses the JSON form; every problem is a <see cref="TopologyException"/> naming the source.</summary>
    public static TopologyDocument Parse(Stream json, string source)
    {
        FileModel? model;
        try
        {
            model = JsonSerializer.Deserialize<FileModel>(json, JsonOptions);
        }
        catch (JsonException e)
        {
            throw new TopologyException($"{source}: not valid topology JSON: {e.Message}");
        }
        if (model?.Devices is not { Count: > 0 } devices)
            throw new TopologyException($"{source}: no \"devices\" listed");
        try
        {
            return new TopologyDocument(devices.Select((d, i) => d.ToSpec(i)));
        }
        catch (TopologyException e)
        {
            throw new TopologyException($"{source}: {e.Message}");
        }
    }

    private void Validate()
    {
        var seen = new HashSet<PciAddress>();
        var secondaries = new Dictionary<byte, PciAddress>();
        foreach (var f in Functions)
        {
            if (!seen.Add(f.Address))
                throw new TopologyException($"device {f.Address} listed twice");
            if (f.IsBridge && f.Kind != PciNodeKind.HostBridge)
            {
                if (f.SecondaryBus is not { } bus)
                    throw new TopologyException($"bridge {f.Address} needs \"secondaryBus\"");
                if (bus <= f.Address.Bus)
                    throw new TopologyException($"bridge {f.Address}: secondaryBus {bus:x2} must be above its own bus");
                if (!secondaries.TryAdd(bus, f.Address))
                    throw new TopologyException($"bus {bus:x2} is below both {secondaries[bus]} and {f.Address}");
            }
            if (f.Driver is not null)
            {
                try
                {
                    Drivers.Validate(f.Driver);
                }
                catch (ErrnoException e)
                {
                    throw new TopologyException($"device {f.Address}: {e.Message}");
                }
            }
        }
        foreach (var f in Functions)
        {
            if (f.Address.Bus != 0 && !secondaries.ContainsKey(f.Address.Bus))
                throw new TopologyException($"device {f.Address}: no bridge leads to bus {f.Address.Bus:x2}");
        }
    }

    private static readonly JsonSerializerOptions JsonOptions = new()
    {
        PropertyNameCaseInsensitive = true,
        ReadCommentHandling = JsonCommentHandling.Skip,
        AllowTrailingCommas = true,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
    };

    private sealed class FileModel
    {
        public string? Comment { get; set; }
        public List<DeviceModel>? Devices { get; set; }
    }

    private sealed class DeviceModel
    {
        public string? Address { get; set; }
        public string? Kind { get; set; }
        public string? VendorId { get; set; }
        public string? DeviceId { get; set; }
        public string? ClassCode { get; set; }
        public string? Model { get; set; }
        public bool Acs { get; set; }
        public string? SecondaryBus { get; set; }
        public string? Driver { get; set; }
        public uint? Group { get; set; }
        public uint? NamespaceMb { get; set; }
        public uint? DmaLatencyUs { get; set; }

        public PciFunctionSpec ToSpec(int index)
        {
            var where = $"devices[{index}]";
            if (!PciAddress.TryParse(Address, out var address))
                throw new TopologyException($"{where}: bad address '{Address}' (expected DDDD:BB:DD.F)");
            where = $"device {address}";
            var kind = Kind switch
            {
                "host-bridge" => PciNodeKind.HostBridge,
                "root-port" => PciNodeKind.RootPort,
                "switch-upstream" => PciNodeKind.SwitchUpstream,
                "switch-downstream" => PciNodeKind.SwitchDownstream,
                "endpoint" or null => PciNodeKind.Endpoint,
                _ => throw new TopologyException($"{where}: unknown kind '{Kind}' (host-bridge, root-port, switch-upstream, switch-downstream, endpoint)"),
            };
            byte? secondary = SecondaryBus is null ? null : (byte)Hex(SecondaryBus, 0xff, "secondaryBus", where);
            var model = string.IsNullOrEmpty(Model) ? (kind == PciNodeKind.Endpoint ? throw new TopologyException($"{where}: needs \"model\"") : "bridge") : Model;
            return new PciFunctionSpec(
                address, kind,
                (ushort)Hex(VendorId, 0xffff, "vendorId", where),
                (ushort)Hex(DeviceId, 0xffff, "deviceId", where),
                Hex(ClassCode, 0xffffff, "classCode", where),
                model, Acs, secondary, string.IsNullOrEmpty(Driver) ? null : Driver, Group)
            {
                NamespaceMb = ModelSetting(NamespaceMb, "namespaceMb", "nvme", PciFunctionSpec.MaxNamespaceMb, PciFunctionSpec.DefaultNamespaceMb),
                DmaLatencyUs = ModelSetting(DmaLatencyUs, "dmaLatencyUs", "edu", PciFunctionSpec.MaxDmaLatencyUs, PciFunctionSpec.DefaultDmaLatencyUs),
            };

            // A key only one model takes, from 1 to max; the default when the file leaves it out.
            uint ModelSetting(uint? value, string key, string only, uint max, uint fallback)
            {
                if (value is not { } v)
                    return fallback;
                if (model != only)
                    throw new TopologyException($"{where}: \"{key}\" applies to model {only} only, not '{model}'");
                if (v is 0 || v > max)
                    throw new TopologyException($"{where}: \"{key}\" must be 1 to {max}, got {v}");
                return v;
            }
        }

        private static uint Hex(string? text, uint max, string field, string where) =>
            uint.TryParse(text, NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var v) && v <= max
                ? v
                : throw new TopologyException($"{where}: \"{field}\" must be hex up to {max:x}, got '{text}'");
    }
}

/// <summary>A topology file that cannot be used, with the reason.</summary>
public sealed class TopologyException(string message) : Exception(message);
