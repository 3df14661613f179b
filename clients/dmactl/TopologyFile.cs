using System.Globalization;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Ctl;

/// <summary>
/// Writes a running broker's devices as a topology file, the JSON the broker's
/// <c>--topology</c> reads (docs/topology.md). The wire carries each device's address, ids, model,
/// driver and group, not the PCI tree's shape, so that is inferred: every device's group is pinned
/// (the same group ids, whatever the rules would say), bridges' secondary buses follow Linux's
/// depth-first bus numbering (or, for a tree not numbered that way, any valid assignment), bridge
/// kinds follow from their depth, and a function has ACS unless its group holds a sibling on its bus.
/// </summary>
internal static class TopologyFile
{
    public static string Write(IEnumerable<Device> devices, string comment)
    {
        var ordered = devices.OrderBy(d => d.Address, StringComparer.Ordinal).ToList();
        var secondary = SecondaryBuses(ordered);
        var kinds = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var d in ordered)
            kinds[d.Address] = Kind(d, secondary, kinds);

        var lines = ordered.Select(d => Output.Serialize(json =>
        {
            json.WriteStartObject();
            json.WriteString("address", d.Address);
            json.WriteString("kind", kinds[d.Address]);
            if (kinds[d.Address] != "host-bridge")
                json.WriteBoolean("acs", !ordered.Any(o => o.Address != d.Address && o.GroupId == d.GroupId && Bus(o) == Bus(d)));
            if (secondary.TryGetValue(d.Address, out var bus))
                json.WriteString("secondaryBus", bus.ToString("x2", CultureInfo.InvariantCulture));
            json.WriteString("vendorId", Output.Hex(d.VendorId, 4));
            json.WriteString("deviceId", Output.Hex(d.DeviceId, 4));
            json.WriteString("classCode", Output.Hex(d.ClassCode, 6));
            json.WriteString("model", d.Model);
            if (d.Driver.Length > 0)
                json.WriteString("driver", d.Driver);
            json.WriteNumber("group", d.GroupId);
            json.WriteEndObject();
        }));
        return $"{{\n  \"comment\": {Output.Serialize(json => json.WriteStringValue(comment))},\n  \"devices\": [\n    {string.Join(",\n    ", lines)}\n  ]\n}}\n";
    }

    private static bool IsBridge(Device d) => d.Model == "bridge";

    // Class 06/00 on bus 0: the host bridge, which has no bus below it.
    private static bool IsHostBridge(Device d) => IsBridge(d) && d.ClassCode >> 8 == 0x0600 && Bus(d) == 0;

    private static int Bus(Device d) => int.Parse(d.Address.AsSpan(5, 2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture);

    private static string Kind(Device d, Dictionary<string, int> secondary, Dictionary<string, string> kinds)
    {
        if (!IsBridge(d))
            return "endpoint";
        if (IsHostBridge(d))
            return "host-bridge";
        var parent = secondary.FirstOrDefault(s => s.Value == Bus(d)).Key;
        // A root port leads to a switch's upstream port, which fans out to downstream ports, which may lead to another switch.
        return parent is null || Bus(d) == 0 ? "root-port" : kinds.GetValueOrDefault(parent) switch
        {
            "root-port" or "switch-downstream" => "switch-upstream",
            _ => "switch-downstream",
        };
    }

    private static Dictionary<string, int> SecondaryBuses(List<Device> devices)
    {
        var bridges = devices.Where(d => IsBridge(d) && !IsHostBridge(d)).ToList();
        var used = devices.Select(Bus).Where(b => b > 0).Distinct().Order().ToList();

        // Linux numbers buses depth first: each bridge takes the next number, then its subtree does.
        var secondary = new Dictionary<string, int>(StringComparer.Ordinal);
        var next = 0;
        void Walk(int bus)
        {
            foreach (var bridge in bridges.Where(b => Bus(b) == bus))
            {
                secondary[bridge.Address] = ++next;
                Walk(next);
            }
        }
        Walk(0);
        if (secondary.Count == bridges.Count && used.All(secondary.ContainsValue))
            return secondary;

        // Numbered some other way: give each bus in use a bridge above it, the deepest one left, and the rest fresh buses.
        secondary.Clear();
        foreach (var bus in used)
        {
            var bridge = bridges.Where(b => !secondary.ContainsKey(b.Address) && Bus(b) < bus).OrderByDescending(Bus).FirstOrDefault()
                ?? throw new InvalidOperationException($"no bridge can lead to bus {bus:x2}");
            secondary[bridge.Address] = bus;
        }
        var fresh = used.Count == 0 ? 1 : used[^1] + 1;
        foreach (var bridge in bridges.Where(b => !secondary.ContainsKey(b.Address)))
            secondary[bridge.Address] = fresh++;
        return secondary;
    }
}
