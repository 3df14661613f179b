using System.Globalization;
using System.Text.Json;
using Google.Protobuf;

namespace DmaBroker.Cluster;

/// <summary>
/// A group's owner as etcd holds it, under <c>/dmabroker/groups/&lt;id&gt;</c>: a user-owned group's
/// key is attached to the owning session's lease, <c>{"kind":"user","session":…,"replica":…,"count":…}</c>;
/// a group with kernel DMA-API drivers bound has a key of no lease, <c>{"kind":"kernel","count":…}</c>.
/// A group with no key is owned by nobody. Encoded the same way every time, so a transaction can
/// compare the key's value with the owner and count the replica expects. A grant's generation is
/// the key's <c>create_revision</c>: the revision of the transaction that granted the group, kept
/// while the count changes, new with the next grant.
/// </summary>
/// <param name="Session">The owning session, unique across the cluster; 0 for kernel drivers.</param>
/// <param name="Replica">The replica that serves it; empty for kernel drivers.</param>
/// <param name="Count">Its claims on the group, or the kernel drivers bound (SPEC §3's owner_cnt).</param>
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

    /// <summary><paramref name="count"/> kernel DMA-API drivers bound to the group's devices, on any replica.</summary>
    public static GroupRecord Kernel(int count) => new(0, "", count);

    /// <summary>Kernel drivers, not a session, own the group.</summary>
    public bool IsKernel => Replica.Length == 0;

    // Replica names are [a-z0-9._-] (EtcdStoreOptions), so they need no escaping.
    public ByteString Encode() => ByteString.CopyFromUtf8(IsKernel
        ? string.Create(CultureInfo.InvariantCulture, $"{{\"kind\":\"kernel\",\"count\":{Count}}}")
        : string.Create(CultureInfo.InvariantCulture,
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
            if (root.GetProperty("kind").GetString() == "kernel")
                return Kernel(root.GetProperty("count").GetInt32());
            return new GroupRecord(root.GetProperty("session").GetUInt64(), root.GetProperty("replica").GetString() ?? "",
                root.GetProperty("count").GetInt32());
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            return null;
        }
    }

    public string Describe() => IsKernel
        ? $"owned by {Count} kernel DMA-API driver(s)"
        : $"owned by session {Session} on replica {Replica}";
}
