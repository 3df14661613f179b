using System.Globalization;
using System.Text.Json;
using Google.Protobuf;

namespace DmaBroker.Cluster;

/// <summary>
/// A user-owned group as etcd holds it, under <c>/dmabroker/groups/&lt;id&gt;</c>, attached to the
/// owning session's lease: <c>{"kind":"user","session":…,"replica":…,"count":…}</c>. A group with
/// no key is owned by no session. Encoded the same way every time, so a transaction can compare
/// the key's value with the owner and count the replica expects. The grant's generation is the
/// key's <c>create_revision</c>: the revision of the transaction that granted the group, kept
/// while the count changes, new with the next grant.
/// </summary>
/// <param name="Session">The owning session, unique across the cluster.</param>
/// <param name="Replica">The replica that serves it.</param>
/// <param name="Count">Its claims on the group (SPEC §3's owner_cnt).</param>
internal sealed record GroupRecord(ulong Session, string Replica, int Count)
{
    public const string Prefix = "/dmabroker/groups/";

    public static ByteString Key(uint groupId) => ByteString.CopyFromUtf8(Prefix + groupId.ToString(CultureInfo.InvariantCulture));

    /// <summary>The group a key names, or null for a key that names none.</summary>
    public static uint? GroupOf(ByteString key)
    {
        var text = key.ToStringUtf8();
        return text.StartsWith(Prefix, StringComparison.Ordinal)
            && uint.TryParse(text.AsSpan(Prefix.Length), NumberStyles.None, CultureInfo.InvariantCulture, out var id) ? id : null;
    }

    // Replica names are [a-z0-9._-] (EtcdStoreOptions), so they need no escaping.
    public ByteString Encode() => ByteString.CopyFromUtf8(string.Create(CultureInfo.InvariantCulture,
        $"{{\"kind\":\"user\",\"session\":{Session},\"replica\":\"{Replica}\",\"count\":{Count}}}"));

    /// <summary>The record a value holds, or null for a value that is not one (written by something else).</summary>
    public static GroupRecord? Decode(ByteString value)
    {
        if (value.IsEmpty)
            return null;
        try
        {
            using var doc = JsonDocument.Parse(value.Memory);
            var root = doc.RootElement;
            return new GroupRecord(root.GetProperty("session").GetUInt64(), root.GetProperty("replica").GetString() ?? "",
                root.GetProperty("count").GetInt32());
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            return null;
        }
    }

    public string Describe() => $"owned by session {Session} on replica {Replica}";
}
