//! The ConfigMap holding the rendered chat-service config file.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::BuildError;
use super::meta::child_meta;
use crate::layout::CONFIG_KEY;
use crate::names::Component;
use crate::validated::ValidatedChatService;

pub fn build_config_map(cs: &ValidatedChatService) -> Result<ConfigMap, BuildError> {
    let text = serde_yaml::to_string(&cs.config).map_err(BuildError::RenderConfig)?;
    Ok(ConfigMap {
        metadata: child_meta(cs, cs.names.config_map(), Component::Chat),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), text)])),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;
    use crate::validated::render::ChatConfig;

    #[test]
    fn the_file_reads_back_as_the_validated_config() {
        let cs = validated(FULL);
        let map = build_config_map(&cs).unwrap();
        let text = &map.data.as_ref().unwrap()[CONFIG_KEY];
        assert_eq!(ChatConfig::from_yaml(text).unwrap(), cs.config);
        assert_eq!(map.metadata.name.as_deref(), Some("support-config"));
        assert_eq!(
            map,
            build_config_map(&cs).unwrap(),
            "rendering is deterministic"
        );
    }
}
