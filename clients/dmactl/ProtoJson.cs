using System.Globalization;
using System.Text;
using System.Text.Json;
using Google.Protobuf;
using Google.Protobuf.Reflection;

namespace DmaBroker.Ctl;

/// <summary>
/// dmactl's JSON form of a broker message. Protobuf's own JSON mapping writes 64-bit integers as
/// strings and enums as <c>OWNER_KIND_USER</c>; scripts want numbers and <c>user</c>. Field names
/// stay protobuf's lowerCamelCase JSON names; every field is written, defaults included, except the
/// oneof members that are not set.
/// </summary>
internal static class ProtoJson
{
    public static void Write(Utf8JsonWriter json, IMessage message)
    {
        json.WriteStartObject();
        foreach (var field in message.Descriptor.Fields.InFieldNumberOrder())
        {
            var value = field.Accessor.GetValue(message);
            if (field.RealContainingOneof is not null && !field.Accessor.HasValue(message))
                continue;
            json.WritePropertyName(field.JsonName);
            if (field.IsMap)
            {
                json.WriteStartObject();
                foreach (System.Collections.DictionaryEntry entry in (System.Collections.IDictionary)value)
                {
                    json.WritePropertyName(Convert.ToString(entry.Key, CultureInfo.InvariantCulture) ?? "");
                    WriteValue(json, field.MessageType.FindFieldByNumber(2), entry.Value);
                }
                json.WriteEndObject();
            }
            else if (field.IsRepeated)
            {
                json.WriteStartArray();
                foreach (var item in (System.Collections.IEnumerable)value)
                    WriteValue(json, field, item);
                json.WriteEndArray();
            }
            else
            {
                WriteValue(json, field, value);
            }
        }
        json.WriteEndObject();
    }

    /// <summary>An enum value's short name: <c>OWNER_KIND_USER</c> of <c>OwnerKind</c> is <c>user</c>.</summary>
    public static string EnumName(EnumDescriptor type, int number)
    {
        var name = type.FindValueByNumber(number)?.Name;
        if (name is null)
            return number.ToString(CultureInfo.InvariantCulture);
        var prefix = UpperSnake(type.Name) + "_";
        return (name.StartsWith(prefix, StringComparison.Ordinal) ? name[prefix.Length..] : name).ToLowerInvariant();
    }

    private static void WriteValue(Utf8JsonWriter json, FieldDescriptor field, object? value)
    {
        switch (value)
        {
            case IMessage message:
                Write(json, message);
                break;
            case ByteString bytes:
                json.WriteBase64StringValue(bytes.Span);
                break;
            case Enum or int when field.FieldType == FieldType.Enum:
                json.WriteStringValue(EnumName(field.EnumType, Convert.ToInt32(value, CultureInfo.InvariantCulture)));
                break;
            default:
                WriteScalar(json, value);
                break;
        }
    }

    /// <summary>A string, bool or number as its JSON value; 64-bit integers stay numbers.</summary>
    public static void WriteScalar(Utf8JsonWriter json, object? value)
    {
        switch (value)
        {
            case null:
                json.WriteNullValue();
                break;
            case string s:
                json.WriteStringValue(s);
                break;
            case bool b:
                json.WriteBooleanValue(b);
                break;
            case ulong u:
                json.WriteNumberValue(u);
                break;
            case int or uint or long:
                json.WriteNumberValue(Convert.ToInt64(value, CultureInfo.InvariantCulture));
                break;
            case float or double:
                json.WriteNumberValue(Convert.ToDouble(value, CultureInfo.InvariantCulture));
                break;
            default:
                throw new NotSupportedException($"dmactl cannot write a {value.GetType().Name} as JSON");
        }
    }

    private static string UpperSnake(string pascal)
    {
        var text = new StringBuilder(pascal.Length + 4);
        for (var i = 0; i < pascal.Length; i++)
        {
            if (i > 0 && char.IsUpper(pascal[i]) && !char.IsUpper(pascal[i - 1]))
                text.Append('_');
            text.Append(char.ToUpperInvariant(pascal[i]));
        }
        return text.ToString();
    }
}
