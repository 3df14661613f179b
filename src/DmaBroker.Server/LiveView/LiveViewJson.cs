using System.Globalization;
using System.Text.Json;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;

namespace DmaBroker.Server.LiveView;

/// <summary>
/// The live view's JSON: the journal's snapshots and changes with the proto's field names, and,
/// for a user-owned group, the owning session's principal and client name while it lives.
/// Written straight into the response, no intermediate objects.
/// </summary>
internal static class LiveViewJson
{
    /// <summary>The SSE event name of a change, as the page listens for it.</summary>
    public static string EventName(TopologyChange change) => change switch
    {
        GroupChanged => "group",
        DeviceChanged => "device",
        DeviceRemoved => "device_removed",
        GroupRemoved => "group_removed",
        SessionEnded => "session_ended",
        _ => throw new ArgumentOutOfRangeException(nameof(change)),
    };

    /// <summary>The whole table, with the latest changes before it for the page's event list.</summary>
    public static void WriteSnapshot(Utf8JsonWriter json, string boot, TopologySnapshot snapshot, IEnumerable<TopologyEvent> recent, SessionRegistry sessions)
    {
        json.WriteStartObject();
        json.WriteString("boot", boot);
        json.WriteNumber("revision", snapshot.Revision);
        json.WriteStartArray("groups");
        foreach (var group in snapshot.Groups.Values)
            WriteGroup(json, group, sessions);
        json.WriteEndArray();
        json.WriteStartArray("devices");
        foreach (var device in snapshot.Devices.Values)
            WriteDevice(json, device);
        json.WriteEndArray();
        json.WriteStartArray("recent");
        foreach (var ev in recent)
        {
            json.WriteStartObject();
            json.WriteNumber("revision", ev.Revision);
            json.WriteString("event", EventName(ev.Change!));
            json.WritePropertyName("data");
            WriteChange(json, ev.Change!, sessions);
            json.WriteEndObject();
        }
        json.WriteEndArray();
        json.WriteEndObject();
    }

    /// <summary>A change, as the object its event's data carries.</summary>
    public static void WriteChange(Utf8JsonWriter json, TopologyChange change, SessionRegistry sessions)
    {
        switch (change)
        {
            case GroupChanged g:
                WriteGroup(json, g.Group, sessions);
                break;
            case DeviceChanged d:
                WriteDevice(json, d.Device);
                break;
            case DeviceRemoved r:
                json.WriteStartObject();
                json.WriteString("address", r.Address.ToString());
                json.WriteEndObject();
                break;
            case GroupRemoved r:
                json.WriteStartObject();
                json.WriteNumber("id", r.GroupId);
                json.WriteEndObject();
                break;
            case SessionEnded e:
                json.WriteStartObject();
                json.WriteNumber("session", e.SessionId);
                json.WriteString("reason", e.Reason);
                json.WriteEndObject();
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(change));
        }
    }

    private static void WriteGroup(Utf8JsonWriter json, GroupInfo group, SessionRegistry sessions)
    {
        json.WriteStartObject();
        json.WriteNumber("id", group.Id);
        json.WriteStartArray("devices");
        foreach (var address in group.Devices)
            json.WriteStringValue(address.ToString());
        json.WriteEndArray();
        json.WriteString("owner_kind", Upper(group.OwnerKind.ToString()));
        json.WriteNumber("owner_count", group.OwnerCount);
        json.WriteNumber("owner_session", group.OwnerSession);
        // The owner's name is the registry's, not the journal's: a session that has ended meanwhile has none.
        if (group.OwnerKind == OwnerKind.User && sessions.TryFind(group.OwnerSession) is { } owner)
        {
            json.WriteString("principal", owner.Principal);
            json.WriteString("client_name", owner.ClientName);
        }
        json.WriteNumber("generation", group.Generation);
        json.WriteString("domain", Upper(group.Domain.ToString()));
        json.WriteEndObject();
    }

    private static void WriteDevice(Utf8JsonWriter json, DeviceInfo device)
    {
        json.WriteStartObject();
        json.WriteString("address", device.Address.ToString());
        json.WriteString("vendor_id", device.VendorId.ToString("x4", CultureInfo.InvariantCulture));
        json.WriteString("device_id", device.DeviceId.ToString("x4", CultureInfo.InvariantCulture));
        json.WriteString("class_code", device.ClassCode.ToString("x6", CultureInfo.InvariantCulture));
        json.WriteString("model", device.Model);
        json.WriteString("kind", device.Kind.ToString());
        if (device.Parent is { } parent)
            json.WriteString("parent", parent.ToString());
        json.WriteNumber("group_id", device.GroupId);
        json.WriteString("driver", device.Driver ?? "");
        json.WriteBoolean("driver_managed_dma", device.DriverManagedDma);
        json.WriteEndObject();
    }

    private static string Upper(string name) => name.ToUpperInvariant();
}
