using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

namespace DmaBroker.Core.Access;

/// <summary>A bad auth file: the message names the entry and the field, never a token.</summary>
public sealed class AccessPolicyException(string message) : Exception(message);

/// <summary>
/// The auth file (SPEC §12), parsed and checked: an ordered list of principals or patterns, each
/// with roles, the groups it may claim and its quotas. The first entry whose name matches a
/// principal wins; a principal no entry matches is unauthenticated. Immutable, so a reload swaps
/// one policy for another atomically and calls in flight keep the one they started with.
/// </summary>
public sealed class AccessPolicy
{
    /// <summary>The principal of a caller that presented no credential.</summary>
    public const string Anonymous = "anonymous";

    private static readonly string[] Kinds = ["cert:", "token:", "uid:"];
    private static readonly JsonDocumentOptions JsonOptions = new()
    {
        CommentHandling = JsonCommentHandling.Skip,
        AllowTrailingCommas = true,
        MaxDepth = 16,
    };

    private readonly Entry[] _entries;
    private readonly Grant? _open;

    private AccessPolicy(Entry[] entries, Grant? open)
    {
        _entries = entries;
        _open = open;
    }

    /// <summary>Open mode: no auth file, every caller is <c>anonymous</c> with every role.</summary>
    public bool IsOpen => _open is not null;

    /// <summary>How many principals or patterns the file lists (0 in open mode).</summary>
    public int Count => _entries.Length;

    /// <summary>Open mode's policy: everyone is <c>anonymous</c>, an admin, with <paramref name="quotas"/>.</summary>
    public static AccessPolicy Open(Quotas quotas) =>
        new([], new Grant(Anonymous, Role.Admin, GroupPolicy.All, quotas));

    /// <summary>
    /// What <paramref name="principal"/> may do: the first entry whose name or pattern matches it,
    /// or null when none does (the caller is then unauthenticated).
    /// </summary>
    public Grant? Resolve(string principal)
    {
        if (_open is not null)
            return _open;
        foreach (var entry in _entries)
        {
            if (Glob.MatchStar(entry.Name, principal))
                return entry.GrantFor(principal);
        }
        return null;
    }

    /// <summary>
    /// The principal (<c>token:&lt;name&gt;</c>) whose stored SHA-256 matches the bearer token, or
    /// null. Every stored hash is compared, in constant time, whichever matches.
    /// </summary>
    public string? AuthenticateBearer(string token)
    {
        Span<byte> hash = stackalloc byte[SHA256.HashSizeInBytes];
        var bytes = Encoding.UTF8.GetBytes(token);
        SHA256.HashData(bytes, hash);
        CryptographicOperations.ZeroMemory(bytes);
        string? found = null;
        foreach (var entry in _entries)
        {
            if (entry.TokenSha256 is { } stored && CryptographicOperations.FixedTimeEquals(stored, hash) && found is null)
                found = entry.Name;
        }
        return found;
    }

    /// <summary>Reads and checks an auth file; <see cref="AccessPolicyException"/> says what is wrong and where.</summary>
    public static AccessPolicy Load(string path, Quotas defaults)
    {
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new AccessPolicyException($"cannot read auth file {path}: {e.Message}");
        }
        return Parse(text, defaults, path);
    }

    /// <summary>Parses an auth file's JSON (comments and trailing commas allowed).</summary>
    public static AccessPolicy Parse(string json, Quotas defaults, string source = "auth file")
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(json, JsonOptions);
        }
        catch (JsonException e)
        {
            throw new AccessPolicyException($"{source}: not valid JSON: {e.Message}");
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new AccessPolicyException($"{source}: expected an object with a \"principals\" array");
            CheckKeys(root, source, "principals");
            if (!root.TryGetProperty("principals", out var principals) || principals.ValueKind != JsonValueKind.Array)
                throw new AccessPolicyException($"{source}: expected an object with a \"principals\" array");
            var entries = new List<Entry>();
            var index = 0;
            foreach (var element in principals.EnumerateArray())
                entries.Add(Entry.Parse(element, $"{source}: principals[{index++}]", defaults));
            return new AccessPolicy([.. entries], null);
        }
    }

    private static void CheckKeys(JsonElement obj, string where, params string[] known)
    {
        foreach (var property in obj.EnumerateObject())
        {
            if (!known.Contains(property.Name, StringComparer.Ordinal))
                throw new AccessPolicyException($"{where}: unknown key \"{Clip(property.Name)}\"; expected one of {string.Join(", ", known)}");
        }
    }

    private static string Clip(string text) => text.Length <= 40 ? text : text[..40] + "…";

    /// <summary>One principal or pattern of the file.</summary>
    private sealed record Entry(string Name, byte[]? TokenSha256, Role? Role, GroupPolicy Groups, Quotas Quotas)
    {
        public Grant GrantFor(string principal) => new(principal, Role, Groups, Quotas);

        public static Entry Parse(JsonElement e, string where, Quotas defaults)
        {
            if (e.ValueKind != JsonValueKind.Object)
                throw new AccessPolicyException($"{where}: expected an object");
            CheckKeys(e, where, "name", "token_sha256", "roles", "groups", "quotas");
            var name = String(e, "name", where) ?? throw new AccessPolicyException($"{where}: \"name\" is required");
            where = $"{where} ({Clip(name)})";
            if (name.Length is 0 or > 256)
                throw new AccessPolicyException($"{where}: a name is 1 to 256 characters");
            if (name != Anonymous && name != "*" && !Kinds.Any(k => name.StartsWith(k, StringComparison.Ordinal) && name.Length > k.Length))
                throw new AccessPolicyException($"{where}: a name is \"anonymous\", or cert:<CN>, token:<name> or uid:<n> (or a pattern with *)");
            var token = ParseToken(e, name, where);
            return new Entry(name, token, ParseRoles(e, where), ParseGroups(e, where), ParseQuotas(e, where, defaults));
        }

        private static byte[]? ParseToken(JsonElement e, string name, string where)
        {
            if (String(e, "token_sha256", where) is not { } hex)
                return null;
            if (!name.StartsWith("token:", StringComparison.Ordinal) || Glob.HasWildcard(name))
                throw new AccessPolicyException($"{where}: token_sha256 belongs to a token:<name> entry without wildcards");
            if (hex.Length != 64 || !hex.All(char.IsAsciiHexDigit))
                throw new AccessPolicyException($"{where}: token_sha256 must be 64 hex digits (sha256sum of the token)");
            return Convert.FromHexString(hex);
        }

        private static Access.Role? ParseRoles(JsonElement e, string where)
        {
            if (!e.TryGetProperty("roles", out var roles) || roles.ValueKind != JsonValueKind.Array)
                throw new AccessPolicyException($"{where}: \"roles\" is required: an array of \"admin\", \"user\", \"viewer\" (may be empty)");
            Access.Role? highest = null;
            foreach (var r in roles.EnumerateArray())
            {
                Access.Role role = r.ValueKind == JsonValueKind.String ? r.GetString() switch
                {
                    "admin" => Access.Role.Admin,
                    "user" => Access.Role.User,
                    "viewer" => Access.Role.Viewer,
                    var other => throw new AccessPolicyException($"{where}: unknown role \"{Clip(other ?? "")}\"; expected admin, user or viewer"),
                } : throw new AccessPolicyException($"{where}: roles are strings: admin, user or viewer");
                highest = highest is { } h && h > role ? h : role;
            }
            return highest;
        }

        private static GroupPolicy ParseGroups(JsonElement e, string where)
        {
            if (!e.TryGetProperty("groups", out var groups))
                return GroupPolicy.All;
            if (groups.ValueKind != JsonValueKind.Array)
                throw new AccessPolicyException($"{where}: \"groups\" is an array of group ids and device address globs");
            var ids = new List<uint>();
            var globs = new List<string>();
            foreach (var g in groups.EnumerateArray())
            {
                if (g.ValueKind == JsonValueKind.Number && g.TryGetUInt32(out var id))
                {
                    ids.Add(id);
                }
                else if (g.ValueKind == JsonValueKind.String && g.GetString() is { Length: > 0 and <= 64 } glob
                    && glob.All(c => char.IsAsciiHexDigit(c) || c is ':' or '.' or '*' or '?' or '[' or ']' or '-' or '!' or '^'))
                {
                    globs.Add(glob);
                }
                else
                {
                    throw new AccessPolicyException($"{where}: groups holds group ids (0 to 4294967295) and device address globs such as \"0000:0[89]:*\", not {Clip(g.GetRawText())}");
                }
            }
            return new GroupPolicy(ids, globs);
        }

        private static Quotas ParseQuotas(JsonElement e, string where, Quotas defaults)
        {
            if (!e.TryGetProperty("quotas", out var q))
                return defaults;
            if (q.ValueKind != JsonValueKind.Object)
                throw new AccessPolicyException($"{where}: \"quotas\" is an object");
            where += " quotas";
            CheckKeys(q, where, "sessions", "memory_mb", "containers", "mappings", "dma_streams", "opens_per_second");
            return new Quotas
            {
                Sessions = Int(q, "sessions", where, 0, 1_000_000) ?? defaults.Sessions,
                MemoryBytes = (ulong?)Int(q, "memory_mb", where, 0, 1_048_576) << 20 ?? defaults.MemoryBytes,
                Containers = Int(q, "containers", where, 0, 1_000_000) ?? defaults.Containers,
                Mappings = Int(q, "mappings", where, 0, 1_000_000) ?? defaults.Mappings,
                DmaStreams = Int(q, "dma_streams", where, 0, 1_000_000) ?? defaults.DmaStreams,
                OpensPerSecond = Int(q, "opens_per_second", where, 0, 1_000_000) ?? defaults.OpensPerSecond,
            };
        }

        private static int? Int(JsonElement obj, string key, string where, int min, int max)
        {
            if (!obj.TryGetProperty(key, out var v))
                return null;
            if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt32(out var n) || n < min || n > max)
                throw new AccessPolicyException(string.Create(CultureInfo.InvariantCulture, $"{where}: {key} must be a whole number from {min} to {max}"));
            return n;
        }

        private static string? String(JsonElement obj, string key, string where)
        {
            if (!obj.TryGetProperty(key, out var v))
                return null;
            return v.ValueKind == JsonValueKind.String ? v.GetString() : throw new AccessPolicyException($"{where}: \"{key}\" must be a string");
        }
    }
}
